"""--clamp_quantile 1 (exact mode) and --split_sv: the merged file reproduces the exact delta
Σ ratioᵢ·upᵢ@downᵢ·alphaᵢ/dimᵢ up to the save dtype's rounding when the rank allows it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copylora.formats.lora_file import write_lora
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.merge import main as merge_main
from tests.conftest import GoldenFolder, golden_folder, golden_params
from tests.lora_compare import Factors, compare_deltas, data_section_sha256, module_deltas, read_metadata

# the golden input folders: their inputs are dim 8, so B − A has rank <= 16
TOTAL_RANK = 16

# fp16: the rounding of the saved factors (measured 2.1e-3 worst / 8e-4 median on real_sd15)
FP16_WORST, FP16_MEDIAN = 3e-3, 1e-3
FLOAT_WORST = 1e-5


def exact_deltas(models: list[Path], ratios: list[float]) -> dict[str, Factors]:
    """Per module Σ ratioᵢ·deltaᵢ as one stacked factor pair (float64)."""
    stacked: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for model, ratio in zip(models, ratios):
        for name, (up, down) in module_deltas(load_file(str(model))).items():
            stacked.setdefault(name, []).append((up * ratio, down))
    return {name: (torch.cat([u for u, _ in parts], 1), torch.cat([d for _, d in parts], 0)) for name, parts in stacked.items()}


def merge(models: list[Path], ratios: list[float], out: Path, *extra: str) -> Path:
    args = ["--models", *map(str, models), "--ratios", *map(str, ratios), "--save_to", str(out), "--quiet", *extra]
    assert merge_main(args) == 0
    return out


def golden_inputs(folder: Path) -> tuple[list[Path], list[float]]:
    return [folder / "B.safetensors", folder / "A.safetensors"], [1.0, -1.0]


@pytest.mark.parametrize("folder", golden_params("golden", per="folder"))
def test_golden_inputs_reproduce_the_exact_delta(tmp_path, folder: GoldenFolder):
    models, ratios = golden_inputs(folder.path)
    exact = exact_deltas(models, ratios)
    rank_args = ["--new_rank", str(TOTAL_RANK), "--new_conv_rank", str(TOTAL_RANK), "--clamp_quantile", "1"]

    half = merge(models, ratios, tmp_path / "fp16.safetensors", *rank_args, "--save_precision", "fp16")
    errors = compare_deltas(module_deltas(load_file(str(half))), exact)
    assert errors.worst <= FP16_WORST, (errors.worst, max(errors.errors, key=errors.errors.get))
    assert errors.median <= FP16_MEDIAN, errors.median

    full = merge(models, ratios, tmp_path / "float.safetensors", *rank_args, "--save_precision", "float")
    errors = compare_deltas(module_deltas(load_file(str(full))), exact)
    assert errors.worst <= FLOAT_WORST, (errors.worst, max(errors.errors, key=errors.errors.get))


RANDOM_LAYOUT = [
    ModuleShape("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 96, 96),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 192, 64),
    ModuleShape("lora_unet_down_blocks_0_attentions_0_proj_in", 40, 40, (1, 1)),
    ModuleShape("lora_unet_down_blocks_0_resnets_0_conv1", 48, 24, (3, 3)),
    ModuleShape("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 24, 80),
]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_inputs_reproduce_the_exact_delta(tmp_path, seed, backend):
    """Three inputs of different dims and alphas, ratios not ±1, 3×3 convs, R < and >= min(out, in)."""
    generator = torch.Generator().manual_seed(100 + seed)
    dims = [int(d) for d in torch.randint(2, 10, (3,), generator=generator)]
    alphas = [float(a) for a in torch.rand(3, generator=generator) * 8 + 0.5]
    ratios = [round(float(r), 3) for r in torch.randn(3, generator=generator)]
    models = []
    for index, (dim, alpha) in enumerate(zip(dims, alphas)):
        path = tmp_path / f"in{index}.safetensors"
        write_lora(path, random_lora(RANDOM_LAYOUT, dim, alpha, seed * 10 + index, dtype=torch.float32), {})
        models.append(path)
    exact = exact_deltas(models, ratios)
    rank = str(sum(dims))
    common = ["--new_rank", rank, "--new_conv_rank", rank, "--clamp_quantile", "1", "--backend", backend]

    full = merge(models, ratios, tmp_path / "float.safetensors", *common)
    assert compare_deltas(module_deltas(load_file(str(full))), exact).worst <= FLOAT_WORST
    half = merge(models, ratios, tmp_path / "fp16.safetensors", *common, "--save_precision", "fp16")
    errors = compare_deltas(module_deltas(load_file(str(half))), exact)
    assert errors.worst <= FP16_WORST and errors.median <= FP16_MEDIAN, errors.errors


@pytest.fixture(scope="module")
def real_pair() -> tuple[list[Path], list[float]]:
    """The real SD1.5 pair as cut in tests/data (18 of 264 modules, every kind of shape, both
    all-zero ones): real spectra at a tenth of the cost."""
    return golden_inputs(golden_folder("golden", "real_sd15").path)


def test_stock_quantile_changes_nothing(tmp_path, real_pair):
    """--clamp_quantile 0.99 is the drop-in default, and --report only reads: same bytes either way."""
    models, ratios = real_pair
    base = ["--new_rank", "8", "--save_precision", "fp16", "--backend", "torch"]
    plain = merge(models, ratios, tmp_path / "plain.safetensors", *base)
    explicit = merge(models, ratios, tmp_path / "explicit.safetensors", *base, "--clamp_quantile", "0.99", "--report")
    assert data_section_sha256(plain) == data_section_sha256(explicit)
    volatile = {"modelspec.date", "modelspec.title"}
    plain_md, explicit_md = read_metadata(plain), read_metadata(explicit)
    assert {k: v for k, v in plain_md.items() if k not in volatile} == {
        k: v for k, v in explicit_md.items() if k not in volatile
    }
    # and the clamp is what makes stock lossy: at rank 16 (= R) only the clamp separates it from B − A
    exact = exact_deltas(models, ratios)
    stock = merge(models, ratios, tmp_path / "stock16.safetensors", "--new_rank", "16", "--save_precision", "fp16")
    assert compare_deltas(module_deltas(load_file(str(stock))), exact).median > 10 * FP16_MEDIAN


def split_norms(path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(str(path))
    pairs = []
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            up = tensors[key.replace("lora_down", "lora_up")]
            pairs.append((up.float().reshape(up.shape[0], -1).norm(dim=0), down.float().reshape(down.shape[0], -1).norm(dim=1)))
    return pairs


def test_split_sv_puts_sqrt_s_on_both_factors(tmp_path, real_pair):
    models, ratios = real_pair
    common = ["--new_rank", "16", "--clamp_quantile", "1", "--backend", "torch"]
    stock_split = merge(models, ratios, tmp_path / "s.safetensors", *common)
    sqrt_split = merge(models, ratios, tmp_path / "sqrt.safetensors", *common, "--split_sv")
    # same delta, different factors
    errors = compare_deltas(module_deltas(load_file(str(sqrt_split))), module_deltas(load_file(str(stock_split))))
    assert errors.worst <= FLOAT_WORST
    ratios_seen = []
    for (up_norm, down_norm), (stock_up, stock_down) in zip(split_norms(sqrt_split), split_norms(stock_split)):
        live = stock_up > 1e-12
        if not live.any():  # an all-zero module
            continue
        torch.testing.assert_close(up_norm[live], down_norm[live], rtol=1e-4, atol=0)  # √S each
        torch.testing.assert_close(up_norm[live], stock_up[live].sqrt(), rtol=1e-4, atol=0)
        torch.testing.assert_close(stock_down[live], torch.ones_like(stock_down[live]), rtol=1e-4, atol=0)  # stock: unit rows
        ratios_seen.append(float((stock_up[live] / stock_down[live]).max()))
    assert max(ratios_seen) > 1.5 or min(ratios_seen) < 0.5  # the two splits really differ on this pair


def test_split_sv_with_the_default_clamp_keeps_stocks_error(tmp_path, real_pair):
    """√S on both factors and then the 0.99 clamp would cut far deeper than stock's clamp (real
    pair: 40 % median error instead of 8 %); --split_sv clamps stock's U·S, Vᵀ and splits after."""
    models, ratios = real_pair
    common = ["--new_rank", "16", "--backend", "torch"]
    stock = merge(models, ratios, tmp_path / "stock.safetensors", *common)
    split = merge(models, ratios, tmp_path / "split.safetensors", *common, "--split_sv")
    # the same clamped delta as stock's, so the same error against B − A
    errors = compare_deltas(module_deltas(load_file(str(split))), module_deltas(load_file(str(stock))))
    assert errors.worst <= FLOAT_WORST, (errors.worst, max(errors.errors, key=errors.errors.get))
    exact = exact_deltas(models, ratios)
    stock_error = compare_deltas(module_deltas(load_file(str(stock))), exact)
    split_error = compare_deltas(module_deltas(load_file(str(split))), exact)
    assert stock_error.median > 10 * FP16_MEDIAN  # the clamp really cuts here
    assert split_error.median == pytest.approx(stock_error.median, rel=1e-3)
    # and split evenly: each pair's up column and down row have equal norms (stock's: S and 1)
    for up_norm, down_norm in split_norms(split):
        live = (up_norm > 1e-12) & (down_norm > 1e-12)
        torch.testing.assert_close(up_norm[live], down_norm[live], rtol=1e-2, atol=0)  # fp16 rounding


def test_split_sv_keeps_large_deltas_inside_fp16(tmp_path):
    """A delta with singular values near 2e6: S on up overflows fp16 (max 65504), √S on each does not."""
    shape = ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc2", 64, 64)
    tensors = random_lora([shape], 4, 4.0, seed=3, dtype=torch.float32)
    tensors[f"{shape.name}.lora_up.weight"] *= 4e6 / tensors[f"{shape.name}.lora_up.weight"].norm()
    tensors[f"{shape.name}.lora_down.weight"] /= tensors[f"{shape.name}.lora_down.weight"].norm(dim=1, keepdim=True)
    model = tmp_path / "big.safetensors"
    write_lora(model, tensors, {})
    exact = exact_deltas([model], [1.0])

    common = ["--new_rank", "4", "--clamp_quantile", "1", "--save_precision", "fp16"]
    # S on up overflows fp16: refused (exit 2), no longer written as Inf
    overflow = tmp_path / "s.safetensors"
    assert merge_main(["--models", str(model), "--ratios", "1.0", "--save_to", str(overflow), "--quiet", *common]) == 2
    assert not overflow.exists()
    balanced = merge([model], [1.0], tmp_path / "sqrt.safetensors", *common, "--split_sv")
    errors = compare_deltas(module_deltas(load_file(str(balanced))), exact)
    assert errors.worst <= FP16_WORST, errors.errors
