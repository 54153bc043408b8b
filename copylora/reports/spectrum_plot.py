"""Singular-value spectra per block, and where each module's rank cuts them (matplotlib, optional)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from copylora.errors import CopyloraError
from copylora.formats.naming import block_group
from copylora.pipelines.fidelity import block_order

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
COLUMNS = 4
# Values below this fraction of a module's largest are drawn at the floor (log axis).
FLOOR = 1e-4


@dataclass(frozen=True)
class Spectrum:
    name: str
    singular_values: torch.Tensor  # descending
    rank: int  # how many the file keeps

    @property
    def block(self) -> str:
        return block_group(self.name)


def check_plot_path(path: Path) -> None:
    """Fail before any work when the plot could not be written."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise CopyloraError(f"{path}: unsupported plot type {path.suffix!r} (use {', '.join(PLOT_SUFFIXES)})")
    if not path.parent.is_dir():
        raise CopyloraError(f"{path}: folder {path.parent} does not exist")
    _figure_class()


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CopyloraError(
            f"--plot: needs matplotlib ({exc}); install it with `pip install matplotlib` (copylora's [plot] extra)"
        ) from exc
    return Figure


def plot_spectra(spectra: list[Spectrum], path: Path, title: str) -> None:
    """One panel per block: each module's σᵢ/σ₁ on a log axis, kept values solid, dropped ones
    grey, a dot where the rank cuts. All-zero modules have no spectrum to draw."""
    check_plot_path(path)
    figure_class = _figure_class()
    blocks: dict[str, list[Spectrum]] = {}
    for spectrum in spectra:
        blocks.setdefault(spectrum.block, []).append(spectrum)
    rows = math.ceil(len(blocks) / COLUMNS)
    # a Figure without pyplot: no global state, no GUI backend
    figure = figure_class(figsize=(3.2 * COLUMNS, 2.4 * rows + 0.6), dpi=72, layout="constrained")
    axes = figure.subplots(rows, COLUMNS, squeeze=False, sharey=True)
    for ax, label in zip(axes.flat, sorted(blocks, key=block_order)):
        members = blocks[label]
        for spectrum in members:
            s = spectrum.singular_values.double()
            if s.numel() == 0 or float(s[0]) <= 0.0:
                continue
            relative = (s / s[0]).clamp(min=FLOOR).numpy()
            x = range(1, len(relative) + 1)
            kept = min(spectrum.rank, len(relative))
            ax.plot(list(x)[:kept], relative[:kept], color="tab:blue", lw=0.6)
            if kept < len(relative):
                ax.plot(list(x)[kept - 1 :], relative[kept - 1 :], color="0.65", lw=0.6)
            ax.plot([kept], [relative[kept - 1]], "o", color="tab:red", ms=2.5)
        ranks = sorted({s.rank for s in members})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        ax.set_title(f"{label}: {len(members)} modules, rank {rank_text}", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(FLOOR * 0.8, 1.5)
        ax.grid(True, which="major", lw=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(blocks) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("σᵢ / σ₁", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("i", fontsize=8)
    figure.suptitle(f"{title} (blue: kept, grey: dropped, red: rank cut)", fontsize=10)
    try:
        # Pillow's optimizer keeps the PNG small enough to commit (matplotlib depends on Pillow)
        options = {"pil_kwargs": {"optimize": True}} if path.suffix.lower() == ".png" else {}
        figure.savefig(str(path), **options)
    except OSError as exc:
        raise CopyloraError(f"{path}: cannot write the plot ({exc})") from exc
