"""LyCORIS' Tucker LoCon (`lora_mid`): a 3×3 conv as lora_down (r, in, 1, 1), a core lora_mid
(r, r, kh, kw) and lora_up (out, r, 1, 1); ΔW = einsum("i j k l, i p, j r -> p r k l", mid,
upᵀ, down) · alpha / r (LyCORIS locon.py). kohya's own LoRA/LoCon has no core and is read as
the pair it is (lora_file)."""

from __future__ import annotations

import torch

from copylora.formats.adapters import AdapterProblem, FactorPair, require_float, scale_of, tucker_factors


def tucker_factor_pair(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float | None) -> FactorPair:
    tensors = require_float({"lora_down": down, "lora_mid": mid, "lora_up": up})
    down, mid, up = tensors["lora_down"], tensors["lora_mid"], tensors["lora_up"]
    rank = down.shape[0]
    if (down.dim() != 4 or up.dim() != 4 or mid.dim() != 4 or tuple(down.shape[2:]) != (1, 1)
            or tuple(up.shape[2:]) != (1, 1) or tuple(mid.shape[:2]) != (rank, rank) or up.shape[1] != rank):
        raise AdapterProblem(
            f"Tucker core lora_mid {tuple(mid.shape)} does not fit lora_down {tuple(down.shape)} and lora_up "
            f"{tuple(up.shape)} (expected 1×1 factors and a ({rank}, {rank}, kh, kw) core)"
        )
    w_up, w_down = tucker_factors(mid, up.reshape(up.shape[0], rank).T, down.reshape(rank, -1))
    return FactorPair(up=w_up, down=w_down, scale=scale_of(alpha, rank), kernel=(mid.shape[2], mid.shape[3]))
