"""Adapter modules other than kohya's lora_down/lora_up pair, as factor pairs for the SVD engine.

Each kind has a small pure module (the model: LyCORIS' `lycoris/functional/`): it turns one
module's tensors into up (out × R) and down (R × in·kh·kw) with up · down · scale the delta
kohya's `networks/<kind>.py` applies, exactly and without the dense delta unless R ≥ min(out, in)
(then the dense delta is no bigger). Kinds copylora cannot turn into factors are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copylora.errors import CopyloraError


@dataclass(frozen=True)
class FactorPair:
    """One adapter module as up · down · scale, float32 (shape-only where the stored tensors were on
    the meta device: the reader checks a module and learns its shapes that way before forming it)."""

    up: torch.Tensor  # (out, R)
    down: torch.Tensor  # (R, in·kh·kw)
    scale: float
    kernel: tuple[int, int] | None  # known from the tensors (Tucker core, 4-D factor); None: not stored


class AdapterProblem(CopyloraError):
    """What is wrong with one module's tensors; the reader adds the file and module name."""


def scale_of(alpha: float | None, rank: int) -> float:
    """alpha / rank as kohya's LoHa/LoKr modules apply it: no alpha, or alpha 0, means alpha = rank."""
    return 1.0 if alpha is None or alpha == 0 else alpha / rank


def full_split(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full (m × n) matrix as the cheaper of I·W and W·I: min(m, n) columns."""
    rows, cols = weight.shape
    if rows <= cols:
        return torch.eye(rows, dtype=weight.dtype, device=weight.device), weight
    return weight, torch.eye(cols, dtype=weight.dtype, device=weight.device)


def tucker_factors(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LyCORIS' Tucker rebuild einsum("i j k l, i p, j r -> p r k l", core, w_a, w_b), flattened to
    (out, in·kh·kw), as w_aᵀ · (core ×₂ w_b): rank = core.shape[0]."""
    rank = core.shape[0]
    down = torch.einsum("ijhw,jq->iqhw", core, w_b).reshape(rank, -1)
    return w_a.T.contiguous(), down


def require_2d(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise AdapterProblem(f"{name} must be 2-D, found shape {tuple(tensor.shape)}")


def require_float(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in float32 (the factors' products are formed there, never in fp16)."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterProblem(f"{key} has non-float dtype {tensor.dtype}")
    return {key: tensor.to(torch.float32) for key, tensor in tensors.items()}
