"""LoHa (`hada_*`, kohya's networks/loha.py, LyCORIS loha): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / r.

A Hadamard product of two rank-r products is one product of rank r²: up is the row-wise
Kronecker (face-splitting) product of w1a and w2a (out × r²), down the column-wise one of w1b
and w2b (r² × in), since Σᵢⱼ w1a[o,i] w2a[o,j] w1b[i,c] w2b[j,c] = (w1a·w1b)[o,c] · (w2a·w2b)[o,c].
The Tucker form of 3×3 convs (`hada_t1`/`hada_t2`, w_a and w_b then (r, out) and (r, in)) is first
written as such a product per side. The scale is alpha / r with r = hada_w1_b.shape[0], as kohya.
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

KEYS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})


def _side(tensors: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """(a, b, kernel) of one Hadamard factor: a · b is its (out, in·kh·kw) matrix."""
    w_a, w_b, core = tensors[f"hada_w{n}_a"], tensors[f"hada_w{n}_b"], tensors.get(f"hada_t{n}")
    require_2d(f"hada_w{n}_a", w_a)
    if core is None:
        w_b = w_b.reshape(w_b.shape[0], -1)  # a flat conv's (r, in·kh·kw) as written, 2-D or not
        if w_a.shape[1] != w_b.shape[0]:
            raise AdapterProblem(f"hada_w{n}_a {tuple(w_a.shape)} and hada_w{n}_b {tuple(w_b.shape)}: inner sizes differ")
        return w_a, w_b, None
    require_2d(f"hada_w{n}_b", w_b)
    rank = w_a.shape[0]
    if core.dim() != 4 or tuple(core.shape[:2]) != (rank, w_b.shape[0]) or w_b.shape[0] != rank:
        raise AdapterProblem(
            f"Tucker core hada_t{n} {tuple(core.shape)} does not fit hada_w{n}_a {tuple(w_a.shape)} and "
            f"hada_w{n}_b {tuple(w_b.shape)} (expected ({rank}, {rank}, kh, kw))"
        )
    up, down = tucker_factors(core, w_a, w_b)
    return up, down, (core.shape[2], core.shape[3])


def factor_pair(stored: dict[str, torch.Tensor], alpha: float | None) -> FactorPair:
    tensors = require_float(stored)
    missing = sorted(k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in tensors)
    if missing or (("hada_t1" in tensors) != ("hada_t2" in tensors)):
        absent = missing or [k for k in ("hada_t1", "hada_t2") if k not in tensors]
        raise AdapterProblem(f"LoHa without {', '.join(absent)}")
    rank1, rank2 = tensors["hada_w1_b"].shape[0], tensors["hada_w2_b"].shape[0]
    if rank1 != rank2:
        raise AdapterProblem(f"LoHa ranks differ: hada_w1_b has {rank1}, hada_w2_b has {rank2}")
    a1, b1, kernel1 = _side(tensors, 1)
    a2, b2, kernel2 = _side(tensors, 2)
    if a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1] or kernel1 != kernel2:
        raise AdapterProblem(
            f"the two Hadamard factors differ in shape: ({a1.shape[0]}, {b1.shape[1]}) and ({a2.shape[0]}, {b2.shape[1]})"
        )
    out, columns = a1.shape[0], b1.shape[1]
    if a1.shape[1] * a2.shape[1] >= min(out, columns):
        up, down = full_split((a1 @ b1) * (a2 @ b2))  # the dense delta has no more columns than r²
    else:
        up = (a1[:, :, None] * a2[:, None, :]).reshape(out, -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, columns)
    return FactorPair(up=up, down=down, scale=scale_of(alpha, rank1), kernel=kernel1)
