"""What the merge engine is asked to do, and what it returns — shared by every backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SvdOptions:
    """How each module's SVD becomes LoRA factors.

    clamp_quantile: clamp up and down at this quantile of their joined values (stock: 0.99);
        1 or more means no clamp.
    sqrt_split: put √S on both up and down instead of S on up (stock: S on up). With a clamp,
        merge_jobs clamps stock's U·S and Vᵀ and splits after, which keeps stock's product.
    """

    clamp_quantile: float = 0.99
    sqrt_split: bool = False

    @property
    def clamps(self) -> bool:
        return self.clamp_quantile < 1.0


@dataclass
class ModuleJob:
    """One module's merge: W = Σ scales[i] · ups[i] @ downs[i], keep `rank` singular vectors.

    ups[i] is (out, r_i), downs[i] is (r_i, in_flat) (a 3×3 conv's down flattened); any float
    dtype, any device. scales[i] = ratio · lbw · alpha / dim of input i.

    load: where ups and downs are shape-only (meta) tensors, forms the real ones. An adapter's
    factors (LoHa's are r² wide) can be many times its file's size, so the engine forms them a
    batch at a time, just before that batch runs, and lets them go after.
    """

    name: str
    ups: list[torch.Tensor]
    downs: list[torch.Tensor]
    scales: list[float]
    rank: int
    load: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def __post_init__(self) -> None:
        # zip() over mismatched lists would silently drop inputs; every backend relies on this
        if not len(self.ups) == len(self.downs) == len(self.scales) > 0:
            raise ValueError(
                f"module {self.name}: {len(self.ups)} ups, {len(self.downs)} downs and {len(self.scales)} scales; "
                "give one scale per factor pair (at least one pair)"
            )

    def loaded(self) -> "ModuleJob":
        """This job with real factors: itself, or a copy with the factors `load` forms."""
        if self.load is None:
            return self
        ups, downs = self.load()
        return dataclasses.replace(self, ups=ups, downs=downs, load=None)

    @property
    def factor_bytes(self) -> int:
        """What its factors take once formed, in float32."""
        return 4 * self.total_rank * (self.out_features + self.in_features)

    @property
    def out_features(self) -> int:
        return self.ups[0].shape[0]

    @property
    def in_features(self) -> int:
        return self.downs[0].shape[1]

    @property
    def input_ranks(self) -> tuple[int, ...]:
        return tuple(d.shape[0] for d in self.downs)

    @property
    def total_rank(self) -> int:
        return sum(self.input_ranks)

    @property
    def num_singular_values(self) -> int:
        """How many singular values W can have: min(R, out, in)."""
        return min(self.total_rank, self.out_features, self.in_features)

    def group_key(self) -> tuple[int, int, tuple[int, ...]]:
        """Jobs with equal keys can be stacked into one batch."""
        return (self.out_features, self.in_features, self.input_ranks)


@dataclass
class MergedModule:
    """up (out, rank) and down (rank, in_flat), float32 unless merge_jobs was asked for another
    dtype; the first `num_singular_values` singular values of W (descending, float32), for
    reports and dynamic rank."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
