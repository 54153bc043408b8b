"""copylora.resize beyond the stock goldens: any key family, PEFT/ControlLoRA names, pass-through
keys, .ckpt files, --uniform_alpha, --verbose, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copylora import cli
from copylora.formats.lora_file import write_lora
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.resize import main as resize_main
from tests.lora_compare import module_deltas, read_metadata, relative_error

# Shapes from kohya's networks/lora_flux.py (FLUX.1, hidden 3072, T5-XXL 4096) and lora_sd3.py (SD3 medium, 1536)
FLUX_SD3 = [
    ModuleShape("lora_unet_double_blocks_0_img_attn_proj", 3072, 3072),
    ModuleShape("lora_unet_double_blocks_0_txt_mlp_0", 12288, 3072),
    ModuleShape("lora_unet_single_blocks_0_linear1", 21504, 3072),
    ModuleShape("lora_unet_single_blocks_0_linear2", 3072, 15360),
    ModuleShape("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ModuleShape("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", 10240, 4096),
    ModuleShape("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536),
]
SMALL = [
    ModuleShape("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, (1, 1)),
    ModuleShape("lora_unet_down_blocks_0_resnets_0_conv1", 16, 8, (3, 3)),
    ModuleShape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 24),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 32, 16),
]


def resize(*args: str) -> int:
    return resize_main([*map(str, args), "--quiet", "--backend", "torch"])


def best_rank_k(up: torch.Tensor, down: torch.Tensor, k: int) -> torch.Tensor:
    """The optimal rank-k approximation of up @ down (Eckart–Young), in float64: the SVD of
    R_up · R_downᵀ from the two QRs is the exact SVD of the product (no dense SVD of 21504×3072)."""
    q_up, r_up = torch.linalg.qr(up.double().flatten(1))
    q_down, r_down = torch.linalg.qr(down.double().flatten(1).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return (q_up @ u[:, :k] * s[:k]) @ (vh[:k] @ q_down.T)


def test_flux_and_sd3_modules_resize_to_the_best_rank_k(tmp_path):
    source = tmp_path / "flux.safetensors"
    tensors = random_lora(FLUX_SD3, 8, 4.0, seed=3)
    write_lora(source, tensors, {"ss_network_dim": "8"})
    out = tmp_path / "flux4.safetensors"
    assert resize("--model", source, "--new_rank", 4, "--save_to", out) == 0
    result = load_file(str(out))
    for module in FLUX_SD3:
        name = module.name
        assert result[f"{name}.lora_down.weight"].shape == (4, module.in_features)
        assert float(result[f"{name}.alpha"]) == 2.0  # 4/8 · 4
        ours = result[f"{name}.lora_up.weight"].double() @ result[f"{name}.lora_down.weight"].double()
        want = best_rank_k(tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"], 4)
        assert torch.linalg.norm(ours - want) <= 1e-4 * torch.linalg.norm(want), name  # float32 SVD


def renamed(tensors: dict[str, torch.Tensor], down: str, up: str, suffix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        if rest == "lora_down.weight":
            out[f"{name}.{down}{suffix}"] = value
        elif rest == "lora_up.weight":
            out[f"{name}.{up}{suffix}"] = value
    return out


@pytest.mark.parametrize(("down", "up", "suffix"), [("lora_A", "lora_B", ".weight"), ("down", "up", "")])
def test_peft_and_control_lora_names_are_kept(tmp_path, down, up, suffix):
    kohya = random_lora(SMALL, 6, 6.0, seed=5, dtype=torch.float32)  # alpha = rank: scale 1, like a file without alpha
    other = renamed(kohya, down, up, suffix)
    write_lora(tmp_path / "kohya.safetensors", kohya, {})
    write_lora(tmp_path / "other.safetensors", other, {})
    for stem in ("kohya", "other"):
        assert resize("--model", tmp_path / f"{stem}.safetensors", "--new_rank", 3,
                      "--save_to", tmp_path / f"{stem}3.safetensors") == 0
    ref, result = load_file(str(tmp_path / "kohya3.safetensors")), load_file(str(tmp_path / "other3.safetensors"))
    for module in SMALL:
        for ours, theirs in ((up, "lora_up.weight"), (down, "lora_down.weight")):
            assert result[f"{module.name}.{ours}{suffix}"].equal(ref[f"{module.name}.{theirs}"])
        assert float(result[f"{module.name}.alpha"]) == 3.0  # no alpha in the input: scale 1
    assert len(result) == len(ref)


def test_other_keys_pass_through_cast_like_stock(tmp_path):
    tensors = random_lora(SMALL, 4, 1.0, seed=1)
    tensors["lora_unet_extra.weight"] = torch.randn(3, 5, dtype=torch.float32)
    tensors["step_count"] = torch.tensor([7], dtype=torch.int64)
    source = tmp_path / "in.safetensors"
    write_lora(source, tensors, {"ss_training_comment": "hello", "custom": "kept"})
    out = tmp_path / "out.safetensors"
    assert resize("--model", source, "--new_rank", 2, "--save_precision", "bf16", "--save_to", out) == 0
    result = load_file(str(out))
    assert result["lora_unet_extra.weight"].equal(tensors["lora_unet_extra.weight"].to(torch.bfloat16))
    assert result["step_count"].dtype == torch.bfloat16 and float(result["step_count"]) == 7.0
    assert {v.dtype for v in result.values()} == {torch.bfloat16}
    metadata = read_metadata(out)
    assert metadata["custom"] == "kept"
    assert metadata["ss_training_comment"] == "dimension is resized from 4 to 2; hello"


def test_ckpt_in_and_out(tmp_path):
    tensors = random_lora(SMALL, 4, 2.0, seed=2, dtype=torch.float32)
    source = tmp_path / "in.ckpt"
    torch.save(tensors, source)
    assert resize("--model", source, "--new_rank", 4, "--save_to", tmp_path / "out.pt") == 0
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, theirs in module_deltas(tensors).items():
        assert relative_error(module_deltas(result)[name], theirs) < 1e-5  # rank kept: the same deltas


def test_uniform_alpha_keeps_every_delta(tmp_path):
    tensors = random_lora(SMALL, 8, 4.0, seed=4, dtype=torch.float32)
    for index, module in enumerate(SMALL):  # spectra decaying at different rates: different ranks
        decay = torch.tensor([0.5 ** (j * (index + 1)) for j in range(8)])
        tensors[f"{module.name}.lora_up.weight"] *= decay.reshape(1, 8, *([1] * (tensors[f"{module.name}.lora_up.weight"].dim() - 2)))
    source = tmp_path / "in.safetensors"
    write_lora(source, tensors, {})
    per_module, uniform = tmp_path / "per.safetensors", tmp_path / "uni.safetensors"
    common = ["--model", source, "--new_rank", 6, "--dynamic_method", "sv_ratio", "--dynamic_param", 100]
    assert resize(*common, "--save_to", per_module) == 0
    assert resize(*common, "--uniform_alpha", "--save_to", uniform) == 0
    ref, result = load_file(str(per_module)), load_file(str(uniform))
    assert len({float(ref[f"{m.name}.alpha"]) for m in SMALL}) > 1  # the case the option is for
    assert len({float(result[f"{m.name}.alpha"]) for m in SMALL}) == 1
    ours, theirs = module_deltas(result), module_deltas(ref)
    for name in theirs:
        assert relative_error(ours[name], theirs[name]) < 1e-6


def test_verbose_reports_retention(tmp_path, capsys):
    source = tmp_path / "in.safetensors"
    write_lora(source, random_lora(SMALL, 4, 1.0, seed=6), {})
    assert resize("--model", source, "--new_rank", 4, "--verbose", "--save_to", tmp_path / "o.safetensors") == 0
    out = capsys.readouterr().out
    # rank kept: every module keeps all of its singular values
    assert out.count("kept 100.0% of sum(S), 100.0% of the Frobenius norm") == len(SMALL)
    assert "Frobenius norm retained: mean 100.00%" in out


def test_console_script_knows_resize():
    assert "resize" in cli.usage()


# ---------------------------------------------------------------- bad input


@pytest.fixture
def lora(tmp_path) -> Path:
    path = tmp_path / "in.safetensors"
    write_lora(path, random_lora(SMALL, 4, 1.0, seed=0), {})
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dynamic_method", "sv_fro"], "needs --dynamic_param"),
        (["--dynamic_param", "0.5"], "without --dynamic_method"),
        (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "must be in (0, 1]"),
        (["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "must be >= 1"),
        (["--new_rank", "0"], "--new_rank: must be at least 1"),
        (["--new_conv_rank", "0"], "--new_conv_rank: must be at least 1"),
    ],
)
def test_bad_arguments(tmp_path, lora, capsys, args, needle):
    out = tmp_path / "out.safetensors"
    assert resize("--model", lora, "--save_to", out, *args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_files(tmp_path, lora, capsys):
    before = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert resize("--model", lora, "--save_to", lora) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == before

    cases = {
        "missing.safetensors": (None, "no such file"),
        "corrupt.safetensors": (b"not a safetensors file", "not a valid safetensors file"),
    }
    for name, (data, needle) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        assert resize("--model", tmp_path / name, "--save_to", tmp_path / "o.safetensors") == 2
        assert needle in capsys.readouterr().err
    write_lora(tmp_path / "ckpt.safetensors", {"model.diffusion_model.x.weight": torch.zeros(2, 2)}, {})
    assert resize("--model", tmp_path / "ckpt.safetensors", "--save_to", tmp_path / "o.safetensors") == 2
    assert "not a LoRA" in capsys.readouterr().err
    write_lora(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, {})
    assert resize("--model", tmp_path / "loha.safetensors", "--save_to", tmp_path / "o.safetensors") == 2
    assert "LoHa without hada_w1_b" in capsys.readouterr().err  # an incomplete LoHa (tests/test_loha_lokr.py)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("extra", [("--save_precision", "fp16"), ("--save_precision", "bf16"), (),
                                   ("--save_precision", "fp16", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9")])
def test_factors_in_the_saved_dtype_from_the_engine_match_casting_after(tmp_path, monkeypatch, extra):
    """The engine hands resize its factors in the saved dtype: exactly what casting its float32
    result after the rank is chosen gives (no clamp, so a smaller rank is a prefix)."""
    import copylora.pipelines.svd_resize
    from copylora.engine import merge_jobs

    model = tmp_path / "in.safetensors"
    write_lora(model, random_lora(SMALL, 8, 4.0, 3), {})
    resize("--model", model, "--new_rank", "4", "--save_to", tmp_path / "direct.safetensors", *extra)
    monkeypatch.setattr(copylora.pipelines.svd_resize, "merge_jobs",
                        lambda *args, **kwargs: merge_jobs(*args, **{**kwargs, "out_dtype": torch.float32}))
    resize("--model", model, "--new_rank", "4", "--save_to", tmp_path / "float32.safetensors", *extra)
    direct, through_float32 = load_file(str(tmp_path / "direct.safetensors")), load_file(str(tmp_path / "float32.safetensors"))
    assert direct.keys() == through_float32.keys()
    for key, tensor in direct.items():
        assert tensor.dtype == through_float32[key].dtype and torch.equal(tensor, through_float32[key]), key
