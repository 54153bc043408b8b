"""Synthetic kohya-format LoRAs: the SD1.5 module layout built from the architecture, random factors.

Used by `copylora.demo`, the tests and the benchmarks, so a fresh machine can run the main
job with no files of its own. The layout is derived from SD1.5's structure (CLIP ViT-L text
encoder, U-Net transformer blocks), in kohya's module order; tests check it against a module
list dumped from kohya's own networks/lora.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from copylora.formats.lora_file import write_lora

TEXT_WIDTH, TEXT_LAYERS, TEXT_MLP = 768, 12, 3072
CROSS_ATTENTION_WIDTH = 768
UNET_WIDTHS = (320, 640, 1280)


@dataclass(frozen=True)
class ModuleShape:
    name: str
    out_features: int
    in_features: int
    kernel: tuple[int, int] | None = None  # None: linear; (1, 1) or (3, 3): conv

    def factor_shapes(self, dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(down, up) shapes at rank `dim`, as kohya stores them."""
        if self.kernel is None:
            return (dim, self.in_features), (self.out_features, dim)
        return (dim, self.in_features, *self.kernel), (self.out_features, dim, 1, 1)


def _text_encoder(prefix: str = "lora_te") -> list[ModuleShape]:
    modules = []
    for layer in range(TEXT_LAYERS):
        base = f"{prefix}_text_model_encoder_layers_{layer}"
        modules += [ModuleShape(f"{base}_self_attn_{p}_proj", TEXT_WIDTH, TEXT_WIDTH) for p in ("k", "v", "q", "out")]
        modules += [ModuleShape(f"{base}_mlp_fc1", TEXT_MLP, TEXT_WIDTH), ModuleShape(f"{base}_mlp_fc2", TEXT_WIDTH, TEXT_MLP)]
    return modules


def _transformer(prefix: str, width: int) -> list[ModuleShape]:
    """One SD1.5 Transformer2DModel: 1×1 conv projections around one transformer block."""
    block = f"{prefix}_transformer_blocks_0"
    return [
        ModuleShape(f"{prefix}_proj_in", width, width, (1, 1)),
        *(ModuleShape(f"{block}_attn1_{p}", width, width) for p in ("to_q", "to_k", "to_v", "to_out_0")),
        ModuleShape(f"{block}_ff_net_0_proj", 8 * width, width),  # GEGLU: 2 × 4·width
        ModuleShape(f"{block}_ff_net_2", width, 4 * width),
        ModuleShape(f"{block}_attn2_to_q", width, width),
        ModuleShape(f"{block}_attn2_to_k", width, CROSS_ATTENTION_WIDTH),
        ModuleShape(f"{block}_attn2_to_v", width, CROSS_ATTENTION_WIDTH),
        ModuleShape(f"{block}_attn2_to_out_0", width, width),
        ModuleShape(f"{prefix}_proj_out", width, width, (1, 1)),
    ]


def sd15_layout() -> list[ModuleShape]:
    """The 264 modules kohya's networks.lora creates for SD1.5 (no conv_dim), in kohya's order."""
    unet = []
    for block, width in enumerate(UNET_WIDTHS):
        for attention in range(2):
            unet += _transformer(f"lora_unet_down_blocks_{block}_attentions_{attention}", width)
    for block, width in zip((1, 2, 3), reversed(UNET_WIDTHS)):
        for attention in range(3):
            unet += _transformer(f"lora_unet_up_blocks_{block}_attentions_{attention}", width)
    # kohya's U-Net registers its mid block after the up blocks
    unet += _transformer("lora_unet_mid_block_attentions_0", UNET_WIDTHS[-1])
    return _text_encoder() + unet


def random_lora(
    layout: list[ModuleShape], dim: int, alpha: float, seed: int, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """A LoRA with random factors at a trained LoRA's typical scale (down ~ 1/√in, up small)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in layout:
        down_shape, up_shape = module.factor_shapes(dim)
        fan_in = module.in_features * (module.kernel[0] * module.kernel[1] if module.kernel else 1)
        down = torch.randn(down_shape, generator=generator) / fan_in**0.5
        up = torch.randn(up_shape, generator=generator) * 0.02
        tensors[f"{module.name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{module.name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{module.name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def training_metadata(title: str, dim: int, alpha: float) -> dict[str, str]:
    """The metadata keys a kohya SD1.5 training run writes that the merge reads or passes on."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(alpha)),
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
    }


def write_sd15_pair(folder: Path, dim: int = 8, alpha: float = 1.0, seed: int = 0) -> tuple[Path, Path]:
    """Write A.safetensors and B.safetensors, two SD1.5 LoRAs like a copy-machine pair."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = sd15_layout()
    paths = []
    for offset, title in enumerate(("A", "B")):
        path = folder / f"{title}.safetensors"
        write_lora(path, random_lora(layout, dim, alpha, seed + offset), training_metadata(title, dim, alpha))
        paths.append(path)
    return paths[0], paths[1]
