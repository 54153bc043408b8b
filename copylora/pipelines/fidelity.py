"""How faithful a merged LoRA is to the exact delta it approximates, per module and per block.

For one module the exact delta is W = Σ ratioᵢ·scaleᵢ·upᵢ@downᵢ (singular values S), the merge
keeps rank k, clamps the factors (C) and saves them in some dtype (O). Relative to ‖W‖_F:

- retained: Σ_{i<k} Sᵢ² / Σ Sᵢ², the energy the best rank-k approximation W_k keeps;
- clamp loss: ‖C − W_k‖, what the outlier clamp changes (0 without clamp);
- rounding loss: ‖cast(C) − C‖, what the save dtype's rounding changes;
- error: ‖O − W‖, the saved file against the exact delta, all losses together.

Every norm is computed from factors through small Gram matrices in float64, never from a
dense out×in matrix, so the measurement is exact and cheap.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

import torch

from copylora.engine.reference import thin_svd
from copylora.formats.naming import block_group

Factors = tuple[torch.Tensor, torch.Tensor]  # (out×k, k×in): the matrix up @ down


def as_factors(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> Factors:
    """float64 (out×k, k×in) from stored factors of any shape (conv flattened), scale on up."""
    rank = down.shape[0]
    return up.double().reshape(up.shape[0], rank) * scale, down.double().reshape(rank, -1)


def frobenius_inner(a: Factors, b: Factors) -> float:
    """<a_up a_down, b_up b_down>_F = trace((a_upᵀ b_up)(b_down a_downᵀ))."""
    return float(((a[0].T @ b[0]) * (a[1] @ b[1].T)).sum())


def squared_norm(a: Factors) -> float:
    return max(frobenius_inner(a, a), 0.0)


def squared_distance(a: Factors, b: Factors) -> float:
    """‖a − b‖_F², exact up to float64 cancellation (about 1e-16 of the larger norm²)."""
    return max(squared_norm(a) + squared_norm(b) - 2.0 * frobenius_inner(a, b), 0.0)


def rounding_squared_distance(high: Factors, low: Factors) -> float:
    """‖low − high‖_F² for two nearly equal factor pairs, without cancellation:
    low − high = (low_up − high_up)·high_down + low_up·(low_down − high_down)."""
    return squared_norm((torch.cat([low[0] - high[0], low[0]], dim=1), torch.cat([high[1], low[1] - high[1]], dim=0)))


@dataclass(frozen=True)
class ModuleFidelity:
    name: str
    rank: int
    singular_values: torch.Tensor  # of the exact delta, descending, float64
    clamp_sq: float  # ‖C − W_k‖²
    rounding_sq: float  # ‖cast(C) − C‖²
    error_sq: float  # ‖O − W‖²

    @property
    def block(self) -> str:
        return block_group(self.name)

    @property
    def energy(self) -> float:
        return float(self.singular_values.square().sum())

    @property
    def kept_energy(self) -> float:
        return float(self.singular_values[: self.rank].square().sum())

    @property
    def relative_error(self) -> float | None:
        """‖O − W‖ / ‖W‖; None for an all-zero delta, where it means nothing."""
        return math.sqrt(self.error_sq / self.energy) if self.energy > 0.0 else None


def measure_module(name: str, exact: Factors, rank: int, merged: Factors, cast: Factors, saved: Factors) -> ModuleFidelity:
    """exact: W as stacked factors (P, Q); merged: C in float; cast: C in the save dtype; saved: O.

    merged, cast and saved carry the alpha/rank scale on up. In a merge, cast and saved are the
    same; inspect recomputes C and casts it, and compares the file itself as saved.
    """
    p, q = exact[0].double(), exact[1].double()
    u, s, vh = thin_svd(p, q)
    best = (u[:, :rank] * s[:rank], vh[:rank])
    return ModuleFidelity(
        name=name,
        rank=rank,
        singular_values=s,
        clamp_sq=squared_distance(merged, best),
        rounding_sq=rounding_squared_distance(merged, cast),
        error_sq=squared_distance(saved, (p, q)),
    )


@dataclass(frozen=True)
class Summary:
    """Energy-weighted numbers for a set of modules (a block, or all of them)."""

    label: str
    modules: list[ModuleFidelity]

    @property
    def energy(self) -> float:
        return sum(m.energy for m in self.modules)

    def _relative(self, squared: float) -> float:
        return math.sqrt(squared / self.energy) if self.energy > 0.0 else 0.0

    @property
    def ranks(self) -> str:
        low, high = min(m.rank for m in self.modules), max(m.rank for m in self.modules)
        return str(low) if low == high else f"{low}-{high}"

    @property
    def retained(self) -> float:
        return sum(m.kept_energy for m in self.modules) / self.energy if self.energy > 0.0 else 1.0

    @property
    def clamp_loss(self) -> float:
        return self._relative(sum(m.clamp_sq for m in self.modules))

    @property
    def rounding_loss(self) -> float:
        return self._relative(sum(m.rounding_sq for m in self.modules))

    @property
    def error(self) -> float:
        return self._relative(sum(m.error_sq for m in self.modules))

    @property
    def module_errors(self) -> list[float]:
        return [e for e in (m.relative_error for m in self.modules) if e is not None]

    @property
    def median_error(self) -> float:
        errors = self.module_errors
        return statistics.median(errors) if errors else 0.0

    @property
    def worst_error(self) -> float:
        return max(self.module_errors, default=0.0)


def block_order(label: str) -> tuple[int, str]:
    """Text encoders, then the U-Net from input to output (down/in, mid, up/out), then the rest."""
    stages = (("te", 0), ("down_", 1), ("in_", 1), ("mid", 2), ("up_", 3), ("out_", 3))
    return next((rank for prefix, rank in stages if label.startswith(prefix)), 4), label


def block_summaries(modules: Iterable[ModuleFidelity]) -> list[Summary]:
    """One Summary per block, in the U-Net's order."""
    blocks: dict[str, list[ModuleFidelity]] = {}
    for module in modules:
        blocks.setdefault(module.block, []).append(module)
    return [Summary(label, blocks[label]) for label in sorted(blocks, key=block_order)]


def totals_line(total: Summary, save_dtype: str) -> str:
    """The one-line totals that `merge --report` prints and `inspect` ends with."""
    return (
        f"fidelity vs exact delta: retained {total.retained:.2%} of energy, clamp loss {total.clamp_loss:.2%}, "
        f"{save_dtype} rounding {total.rounding_loss:.3%}, error {total.error:.2%} "
        f"(per module median {total.median_error:.2%}, worst {total.worst_error:.2%})"
    )


TABLE_HEADER = ("block", "modules", "rank", "retained", "clamp loss", "rounding", "error", "median", "worst")


def format_table(summaries: list[Summary], total: Summary) -> str:
    """The per-block table: energies and losses relative to each block's exact delta."""

    def row(s: Summary) -> tuple[str, ...]:
        return (
            s.label, str(len(s.modules)), s.ranks, f"{s.retained:.2%}", f"{s.clamp_loss:.2%}",
            f"{s.rounding_loss:.3%}", f"{s.error:.2%}", f"{s.median_error:.2%}", f"{s.worst_error:.2%}",
        )

    return render_table(TABLE_HEADER, [row(s) for s in summaries], row(total))


def render_table(header: tuple[str, ...], rows: list[tuple[str, ...]], footer: tuple[str, ...]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned, footer under a rule."""
    widths = [max(len(r[i]) for r in (header, *rows, footer)) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows), rule, line(footer)])
