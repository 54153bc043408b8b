"""End-to-end merge semantics on small synthetic LoRAs, checked against dense arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copylora.formats.lora_file import read_lora, write_lora
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.merge import main as merge_main
from tests.lora_compare import module_deltas, read_metadata, relative_error

LAYOUT = [
    ModuleShape("lora_unet_down_blocks_1_attentions_0_proj_in", 24, 24, (1, 1)),
    ModuleShape("lora_unet_down_blocks_1_resnets_0_conv1", 20, 12, (3, 3)),
    ModuleShape("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 32, 40),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 48, 16),
]


def exact_deltas(paths: list[Path], ratios: list[float], lbw_scale: dict[str, list[float]] | None = None):
    """Σ ratio · (alpha/dim) · up @ down per module, from the files, in float64."""
    deltas: dict[str, torch.Tensor] = {}
    for index, (path, ratio) in enumerate(zip(paths, ratios)):
        for name, module in read_lora(path).modules.items():
            lbw = lbw_scale[name][index] if lbw_scale else 1.0
            delta = module.up.double().reshape(module.up.shape[0], module.rank) @ module.down.double().reshape(module.rank, -1)
            deltas[name] = deltas.get(name, 0) + ratio * lbw * module.scale * delta
    return deltas


def merged_deltas(path: Path) -> dict[str, torch.Tensor]:
    return {name: up @ down for name, (up, down) in module_deltas(load_file(str(path))).items()}


def run(models: list[Path], ratios: list[str], out: Path, *extra: str) -> None:
    assert merge_main(["--models", *map(str, models), "--ratios", *ratios, "--save_to", str(out), "--quiet", *extra]) == 0


@pytest.fixture(params=["torch", "auto"])
def backend(request) -> str:
    return request.param


def test_exact_when_rank_covers_and_no_clamp(tmp_path, backend):
    a = tmp_path / "A.safetensors"
    b = tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 4, 1.0, 0, torch.float32), {})
    write_lora(b, random_lora(LAYOUT, 4, 2.0, 1, torch.float32), {})
    out = tmp_path / "d.safetensors"
    run([b, a], ["1", "-1"], out, "--new_rank", "8", "--clamp_quantile", "1", "--backend", backend)
    exact = exact_deltas([b, a], [1.0, -1.0])
    for name, delta in merged_deltas(out).items():
        assert float((delta - exact[name]).norm() / exact[name].norm()) < 1e-5, name


def test_modules_in_some_inputs_and_missing_alpha(tmp_path, backend):
    """A module only one input has merges from that input; no alpha means alpha = dim."""
    a_tensors = random_lora(LAYOUT[:2], 4, 1.0, 2, torch.float32)
    b_tensors = random_lora(LAYOUT, 4, 1.0, 3, torch.float32)
    for key in [k for k in b_tensors if k.endswith(".alpha")]:
        del b_tensors[key]
    a, b = tmp_path / "A.pt", tmp_path / "B.safetensors"
    torch.save(a_tensors, a)
    write_lora(b, b_tensors, None)
    out = tmp_path / "d.safetensors"
    run([b, a], ["0.5", "-1"], out, "--new_rank", "8", "--clamp_quantile", "1", "--backend", backend)
    exact = exact_deltas([b, a], [0.5, -1.0])
    merged = merged_deltas(out)
    assert merged.keys() == exact.keys() == {m.name for m in LAYOUT}
    for name, delta in merged.items():
        assert float((delta - exact[name]).norm() / exact[name].norm()) < 1e-5, name


def test_lbws_scale_blocks(tmp_path):
    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 4, 1.0, 4, torch.float32), {})
    write_lora(b, random_lora(LAYOUT, 4, 1.0, 5, torch.float32), {})
    lbw_b = [1.0] * 26
    lbw_a = [1.0] * 26
    lbw_b[5], lbw_a[0] = 0.25, 3.0  # IN04 of B (down_blocks_1 resnet 0 / attention 0), BASE of A
    out = tmp_path / "d.safetensors"
    run([b, a], ["1", "-1"], out, "--new_rank", "8", "--clamp_quantile", "1",
        "--lbws", str(lbw_b), str(lbw_a), "--backend", "torch")
    scale = {m.name: [1.0, 1.0] for m in LAYOUT}
    scale["lora_unet_down_blocks_1_attentions_0_proj_in"][0] = 0.25
    scale["lora_unet_down_blocks_1_resnets_0_conv1"][0] = 0.25
    scale["lora_te_text_model_encoder_layers_0_mlp_fc1"][1] = 3.0
    exact = exact_deltas([b, a], [1.0, -1.0], scale)
    for name, delta in merged_deltas(out).items():
        assert float((delta - exact[name]).norm() / exact[name].norm()) < 1e-5, name


@pytest.mark.parametrize(("precision", "save_precision", "dtype"),
                         [("fp16", None, torch.float16), ("bf16", None, torch.bfloat16), ("float", "bf16", torch.bfloat16), ("float", None, torch.float32)])
def test_precisions(tmp_path, precision, save_precision, dtype):
    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 4, 1.0, 6), {})
    write_lora(b, random_lora(LAYOUT, 4, 1.0, 7), {})
    out = tmp_path / "d.safetensors"
    extra = ["--precision", precision] + (["--save_precision", save_precision] if save_precision else [])
    run([b, a], ["1", "-1"], out, "--new_rank", "8", "--clamp_quantile", "1", *extra)
    tensors = load_file(str(out))
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {dtype}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.int64}
    exact = exact_deltas([b, a], [1.0, -1.0])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, delta in merged_deltas(out).items():
        assert float((delta - exact[name]).norm() / exact[name].norm()) < tolerance, name


@pytest.mark.parametrize(("precision", "save_precision"),
                         [("float", "fp16"), ("fp16", None), ("fp16", "bf16"), ("bf16", "fp16"), ("fp16", "float"),
                          ("float", None)])
def test_saved_dtype_from_the_engine_rounds_like_stock(tmp_path, monkeypatch, precision, save_precision):
    """Where the engine hands back the saved dtype directly, the file holds exactly what stock's
    float32 → --precision → --save_precision casts of the float32 result give."""
    import copylora.pipelines.svd_merge

    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 4, 1.0, 8), {})
    write_lora(b, random_lora(LAYOUT, 4, 1.0, 9), {})
    extra = ["--new_rank", "6", "--precision", precision] + (["--save_precision", save_precision] if save_precision else [])
    run([b, a], ["1", "-1"], tmp_path / "direct.safetensors", *extra)
    # the reference: a float32 result, cast as stock casts it
    monkeypatch.setattr(copylora.pipelines.svd_merge, "engine_output_dtype", lambda *args: torch.float32)
    monkeypatch.setattr(copylora.pipelines.svd_merge, "as_saved", lambda factor, merge, save: factor.to(merge).to(save))
    run([b, a], ["1", "-1"], tmp_path / "float32.safetensors", *extra)
    direct, through_float32 = load_file(str(tmp_path / "direct.safetensors")), load_file(str(tmp_path / "float32.safetensors"))
    assert direct.keys() == through_float32.keys()
    for key, tensor in direct.items():
        assert tensor.dtype == through_float32[key].dtype and torch.equal(tensor, through_float32[key]), key


def test_ranks_alpha_and_shapes_follow_stock(tmp_path):
    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 8, 1.0, 8), {"ss_v2": "False", "ss_base_model_version": "sd_v1"})
    write_lora(b, random_lora(LAYOUT, 8, 1.0, 9), {})
    out = tmp_path / "d.safetensors"
    run([b, a], ["1", "-1"], out, "--new_rank", "16", "--new_conv_rank", "6")
    tensors = load_file(str(out))
    # rank capped by out and in *channels*; 3×3 conv uses new_conv_rank, 1×1 conv new_rank
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (6, 12, 3, 3)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape == (20, 6, 1, 1)
    assert tensors["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].shape == (16, 24, 1, 1)
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (16, 16)
    assert int(tensors["lora_unet_down_blocks_1_resnets_0_conv1.alpha"]) == 6
    metadata = read_metadata(out)
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "16"
    assert metadata["ss_network_args"] == '{"conv_dim": 6, "conv_alpha": 6}'
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["modelspec.merged_from"] == "B, A"


def test_same_inputs_same_bytes(tmp_path, backend):
    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 8, 1.0, 10), {})
    write_lora(b, random_lora(LAYOUT, 8, 1.0, 11), {})
    outs = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    for out in outs:
        run([b, a], ["1", "-1"], out, "--new_rank", "16", "--no_metadata", "--backend", backend)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert not any(k.startswith("modelspec.") for k in read_metadata(outs[0]))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_output_like_stock(tmp_path, suffix):
    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 4, 1.0, 12), {})
    write_lora(b, random_lora(LAYOUT, 4, 1.0, 13), {})
    out = tmp_path / f"d{suffix}"
    run([b, a], ["1", "-1"], out, "--new_rank", "4")
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == set(load_file(str(a)))
    assert read_lora(out).modules.keys() == {m.name for m in LAYOUT}


def test_matches_stock_within_noise_on_synthetic_sd15(tmp_path):
    """Against kohya's dense algorithm (reimplemented in engine.reference) on a synthetic pair."""
    from copylora.engine.jobs import ModuleJob
    from copylora.engine.reference import dense_stock_merge

    a, b = tmp_path / "A.safetensors", tmp_path / "B.safetensors"
    write_lora(a, random_lora(LAYOUT, 8, 1.0, 14), {})
    write_lora(b, random_lora(LAYOUT, 8, 1.0, 15), {})
    out = tmp_path / "d.safetensors"
    run([b, a], ["1", "-1"], out, "--new_rank", "16")
    ours = module_deltas(load_file(str(out)))
    fa, fb = read_lora(a), read_lora(b)
    for name, (up, down) in ours.items():
        mb, ma = fb.modules[name], fa.modules[name]
        job = ModuleJob(name, [m.up.float().reshape(m.up.shape[0], -1) for m in (mb, ma)],
                        [m.down.float().reshape(m.rank, -1) for m in (mb, ma)], [mb.scale, -ma.scale], up.shape[1])
        ref_up, ref_down = dense_stock_merge(job)
        assert relative_error((up, down), (ref_up.double(), ref_down.double())) < 6e-2, name
