"""Dynamic-rank files written with one alpha — copylora's dynamic merge by default, resize with
--uniform_alpha — load right through diffusers' real kohya loader (`lora_state_dict` +
`load_lora_into_unet`, what `load_lora_weights` runs): every module's applied delta is the file's
alpha / rank · up @ down. (With an alpha per module, diffusers gives every module the commonest.)

diffusers (and peft, which its loader needs) are optional: `pip install diffusers peft`; without
them this test skips. The U-Net is a tiny randomly initialised SD-layout UNet2DConditionModel, so
nothing is downloaded; the LoRA covers every attention-block layer kohya's networks.lora targets.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copylora.formats.lora_file import write_lora
from copylora.merge import main as merge_main
from copylora.resize import main as resize_main

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (optional: pip install diffusers peft)")
pytest.importorskip("peft", reason="peft not installed (diffusers' LoRA loader needs it: pip install peft)")

# the layers kohya's networks.lora puts a LoRA on inside each Transformer2DModel
TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def kohya_lora(unet: torch.nn.Module, dim: int) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA on the U-Net's attention layers; spectra decaying at different rates, so
    a dynamic resize gives the modules different ranks (and so different alphas)."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    layers = [(n, m) for n, m in unet.named_modules() if "attentions" in n and n.endswith(TARGETS)
              and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for index, (name, layer) in enumerate(layers):
        key = "lora_unet_" + name.replace(".", "_")
        out_features, in_features = layer.weight.shape[:2]
        tail = (1, 1) if layer.weight.dim() == 4 else ()
        decay = torch.tensor([0.6 ** (j * (1 + index % 4)) for j in range(dim)])
        tensors[f"{key}.lora_down.weight"] = torch.randn(dim, in_features, *tail, generator=generator)
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out_features, dim, generator=generator) * decay).reshape(
            out_features, dim, *tail) * 0.05
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    return tensors


def applied_deltas(unet: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """What the loaded PEFT layers add to each weight: scaling · B @ A, keyed by kohya name."""
    deltas = {}
    for name, layer in unet.named_modules():
        if adapter in getattr(layer, "lora_A", {}):
            b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            deltas["lora_unet_" + name.replace(".", "_")] = layer.scaling[adapter] * (b.flatten(1) @ a.flatten(1))
    return deltas


DYNAMIC = ["--new_rank", "8", "--dynamic_method", "sv_ratio", "--dynamic_param", "20", "--quiet"]


def dynamic_resize(source: Path, out: Path) -> int:
    return resize_main(["--model", str(source), *DYNAMIC, "--uniform_alpha", "--save_to", str(out)])


def dynamic_merge(source: Path, out: Path) -> int:
    return merge_main(["--models", str(source), "--ratios", "1", *DYNAMIC, "--save_to", str(out)])


@pytest.mark.parametrize("write", [dynamic_resize, dynamic_merge], ids=["resize --uniform_alpha", "merge"])
def test_one_alpha_dynamic_files_load_right_in_diffusers(tmp_path, write):
    unet = tiny_unet()
    source, out = tmp_path / "lora.safetensors", tmp_path / "dynamic.safetensors"
    write_lora(source, kohya_lora(unet, 8), {})
    assert write(source, out) == 0
    resized = load_file(str(out))
    names = [k[: -len(".lora_down.weight")] for k in resized if k.endswith(".lora_down.weight")]
    assert len({resized[f"{n}.lora_down.weight"].shape[0] for n in names}) > 1  # ranks really vary

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(dict(resized))
        diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="resized")
    applied = applied_deltas(unet, "resized")
    assert applied.keys() == set(names)
    for name in names:
        up, down = resized[f"{name}.lora_up.weight"], resized[f"{name}.lora_down.weight"]
        want = float(resized[f"{name}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        assert torch.linalg.norm(applied[name] - want) <= 1e-5 * torch.linalg.norm(want), name
