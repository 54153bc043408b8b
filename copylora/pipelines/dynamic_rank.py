"""Per-module rank from the singular values, with the meanings of kohya's resize_lora.py.

`--dynamic_method` / `--dynamic_param` mean what they mean to `networks/resize_lora.py`:

- sv_ratio P: keep the singular values larger than S₀ / P;
- sv_fro P: keep the fewest leading values whose root sum of squares reaches P · ‖S‖₂;
- sv_cumulative P: keep the fewest leading values whose sum reaches P · ΣS.

resize_lora then keeps one value more than that count (its index arithmetic), never fewer than
2 or more than the dense spectrum's length, caps the result at --new_rank (--new_conv_rank for
3×3 convs), and gives an all-zero module rank 1. copylora follows all of it, so the same flags
give the same ranks, with one exception: it never exceeds the delta's possible rank
min(R, out, in), where resize_lora would pad a column of numerical noise.
"""

from __future__ import annotations

import torch

from copylora.errors import CopyloraError

DYNAMIC_METHODS: tuple[str, ...] = ("sv_ratio", "sv_fro", "sv_cumulative")

# resize_lora's threshold below which a module counts as all zero
MIN_SINGULAR_VALUE = 1e-6


def validate_dynamic(method: str | None, param: float | None) -> None:
    """Check --dynamic_method / --dynamic_param together, before any work."""
    if method is None:
        if param is not None:
            raise CopyloraError("--dynamic_param: given without --dynamic_method (one of sv_ratio, sv_fro, sv_cumulative)")
        return
    if method not in DYNAMIC_METHODS:
        raise CopyloraError(f"--dynamic_method: {method!r} is not one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise CopyloraError(f"--dynamic_method {method}: needs --dynamic_param")
    if method == "sv_ratio" and not param >= 1.0:
        raise CopyloraError(f"--dynamic_param: sv_ratio keeps values within a factor P of the largest; P must be >= 1, got {param}")
    if method != "sv_ratio" and not 0.0 < param <= 1.0:
        raise CopyloraError(f"--dynamic_param: {method} is a fraction of the total; must be in (0, 1], got {param}")


def values_needed(singular_values: torch.Tensor, method: str, param: float) -> int:
    """How many leading singular values the method's threshold asks for (before resize_lora's +1)."""
    s = singular_values.double()
    if method == "sv_ratio":
        return int((s > s[0] / param).sum())
    weights = s.square() if method == "sv_fro" else s
    target = param**2 if method == "sv_fro" else param
    cumulative = weights.cumsum(0)
    cumulative = cumulative / cumulative[-1]  # ends at exactly 1, so every target <= 1 is reached
    return int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64))) + 1


def is_zero_spectrum(singular_values: torch.Tensor) -> bool:
    """resize_lora's all-zero test: no singular value above MIN_SINGULAR_VALUE (rank 1 then)."""
    return singular_values.shape[0] == 0 or float(singular_values[0]) <= MIN_SINGULAR_VALUE


def dynamic_rank(singular_values: torch.Tensor, max_rank: int, dense_size: int, method: str, param: float) -> int:
    """The rank resize_lora would choose for a module with these singular values.

    singular_values: the delta's min(R, out, in) singular values, descending;
    max_rank: the cap (--new_rank or --new_conv_rank, already capped by out and in);
    dense_size: min(out, in), the length of the dense spectrum resize_lora works on.
    """
    available = singular_values.shape[0]
    if is_zero_spectrum(singular_values):
        return 1
    index = max(1, min(values_needed(singular_values, method, param), dense_size - 1))
    return max(1, min(index + 1, max_rank, available))
