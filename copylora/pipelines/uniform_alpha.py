"""One alpha for every module, each module's own factor folded into its up.

A kohya module applies alpha / rank · up · down. Files whose alpha differs per module (dynamic
ranks) load wrong in diffusers' kohya loader (it gives every module the most common alpha), while
ComfyUI, A1111, Forge and kohya read them right. Writing one alpha A for all modules and scaling
each up by alpha_i / A gives the same deltas and loads right everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def common_alpha(alphas: Sequence[float]) -> float:
    """The alpha most modules already have (the largest on a tie), so most ups stay unscaled."""
    counts = Counter(alphas)
    return max(counts, key=lambda alpha: (counts[alpha], alpha))


def folded_up(up: torch.Tensor, alpha: float, shared: float) -> torch.Tensor:
    """The up of a module with its own `alpha`, written under the file's `shared` alpha: the factor
    alpha / shared folded in, so alpha / rank · up @ down (the delta kohya applies) is unchanged."""
    return up if alpha == shared else up * (alpha / shared)
