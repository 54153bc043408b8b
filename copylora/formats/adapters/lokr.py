"""LoKr (`lokr_*`, kohya's networks/lokr.py, LyCORIS lokr): ΔW = kron(W1, W2) · scale.

W1 is `lokr_w1` or `lokr_w1_a`·`lokr_w1_b`; W2 is `lokr_w2`, `lokr_w2_a`·`lokr_w2_b`, or for 3×3
convs the Tucker form (`lokr_t2`, w2_a (r, out_k), w2_b (r, in_n)). A conv's W2 is flattened to
(out_k, in_n·kh·kw): kron(W1, W2) flattened is then the conv's (out, in·kh·kw) delta. With
W1 = A1·B1 and W2 = A2·B2, the mixed-product rule gives kron(W1, W2) = kron(A1, A2) · kron(B1, B2),
a product of rank r1·r2 (a full side is split as I·W or W·I, min of its sides).

Scale as kohya applies it: 1 when both W1 and W2 are full; else alpha / r with r the rank of the
low-rank side(s) (kohya: lokr_w2_b.shape[0]; LyCORIS, which also writes lokr_w1_a/_b:
lokr_w1_b.shape[0]); no alpha or alpha 0 means alpha = r.
"""

from __future__ import annotations

import torch

from copylora.formats.adapters import (
    AdapterProblem,
    FactorPair,
    full_split,
    require_2d,
    require_float,
    scale_of,
    tucker_factors,
)

KEYS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})


def _product(tensors: dict[str, torch.Tensor], a_key: str, b_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    w_a, w_b = tensors[a_key], tensors[b_key]
    require_2d(a_key, w_a)
    w_b = w_b.reshape(w_b.shape[0], -1)  # LyCORIS writes a flat conv's w2_b 4-D, kohya 2-D
    if w_a.shape[1] != w_b.shape[0]:
        raise AdapterProblem(f"{a_key} {tuple(w_a.shape)} and {b_key} {tuple(tensors[b_key].shape)}: inner sizes differ")
    return w_a, w_b


def _w1(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(A1, B1, rank): rank None when W1 is full."""
    if "lokr_w1" in tensors:
        if "lokr_w1_a" in tensors or "lokr_w1_b" in tensors:
            raise AdapterProblem("LoKr with both lokr_w1 and lokr_w1_a/lokr_w1_b")
        require_2d("lokr_w1", tensors["lokr_w1"])
        return (*full_split(tensors["lokr_w1"]), None)
    if "lokr_w1_a" in tensors and "lokr_w1_b" in tensors:
        a1, b1 = _product(tensors, "lokr_w1_a", "lokr_w1_b")
        return a1, b1, b1.shape[0]
    raise AdapterProblem("LoKr without lokr_w1 (or lokr_w1_a and lokr_w1_b)")


def _w2(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None, tuple[int, int] | None]:
    """(A2, B2, rank, kernel): rank None when W2 is full; kernel when the tensors give it."""
    if "lokr_w2" in tensors:
        if {"lokr_w2_a", "lokr_w2_b", "lokr_t2"} & tensors.keys():
            raise AdapterProblem("LoKr with both lokr_w2 and lokr_w2_a/lokr_w2_b")
        w2 = tensors["lokr_w2"]
        if w2.dim() not in (2, 4):
            raise AdapterProblem(f"lokr_w2 must be 2-D or 4-D, found shape {tuple(w2.shape)}")
        kernel = (w2.shape[2], w2.shape[3]) if w2.dim() == 4 else None
        return (*full_split(w2.reshape(w2.shape[0], -1)), None, kernel)
    if "lokr_w2_a" not in tensors or "lokr_w2_b" not in tensors:
        raise AdapterProblem("LoKr without lokr_w2 (or lokr_w2_a and lokr_w2_b)")
    core = tensors.get("lokr_t2")
    if core is None:
        a2, b2 = _product(tensors, "lokr_w2_a", "lokr_w2_b")
        w2b = tensors["lokr_w2_b"]
        return a2, b2, b2.shape[0], ((w2b.shape[2], w2b.shape[3]) if w2b.dim() == 4 else None)
    w_a, w_b = tensors["lokr_w2_a"], tensors["lokr_w2_b"]
    require_2d("lokr_w2_a", w_a)
    require_2d("lokr_w2_b", w_b)
    rank = w_a.shape[0]
    if core.dim() != 4 or tuple(core.shape[:2]) != (rank, rank) or w_b.shape[0] != rank:
        raise AdapterProblem(
            f"Tucker core lokr_t2 {tuple(core.shape)} does not fit lokr_w2_a {tuple(w_a.shape)} and "
            f"lokr_w2_b {tuple(w_b.shape)} (expected ({rank}, {rank}, kh, kw))"
        )
    a2, b2 = tucker_factors(core, w_a, w_b)
    return a2, b2, rank, (core.shape[2], core.shape[3])


def factor_pair(stored: dict[str, torch.Tensor], alpha: float | None) -> FactorPair:
    tensors = require_float(stored)
    a1, b1, rank1 = _w1(tensors)
    a2, b2, rank2, kernel = _w2(tensors)
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise AdapterProblem(f"LoKr ranks differ: lokr_w1_b has {rank1}, lokr_w2_b has {rank2}")
    rank = rank1 if rank1 is not None else rank2
    scale = 1.0 if rank is None else scale_of(alpha, rank)
    out, columns = a1.shape[0] * a2.shape[0], b1.shape[1] * b2.shape[1]
    if a1.shape[1] * a2.shape[1] >= min(out, columns):
        up, down = full_split(torch.kron((a1 @ b1).contiguous(), (a2 @ b2).contiguous()))  # no more columns
    else:
        up, down = torch.kron(a1.contiguous(), a2.contiguous()), torch.kron(b1.contiguous(), b2.contiguous())
    return FactorPair(up=up, down=down, scale=scale, kernel=kernel)
