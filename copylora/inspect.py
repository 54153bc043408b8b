"""`python -m copylora.inspect`: ranks, retained energy, clamp and rounding loss of a merged LoRA.

    python -m copylora.inspect diff.safetensors --against B.safetensors A.safetensors --ratios 1 -1 \
        --plot spectrum.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import copylora.runtime.openmp_wait  # noqa: F401  (before torch loads OpenMP)
from copylora.engine import BACKEND_CHOICES
from copylora.errors import run_cli, shown
from copylora.pipelines.fidelity import Summary, block_summaries, format_table, render_table, totals_line
from copylora.pipelines.inspection import inspect_lora, rank_rows
from copylora.reports.spectrum_plot import check_plot_path, plot_spectra
from copylora.runtime.arg_types import finite_float, finite_lbw
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.inspect"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG),
        description="Per block (text encoder, down/mid/up blocks): the ranks of a merged LoRA and, given the "
        "models it was merged from, how much of the exact delta it keeps and what the clamp and the save "
        "dtype's rounding cost (all relative Frobenius norms).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("lora", type=Path, help="the merged LoRA (.safetensors, .ckpt, .pt)")
    parser.add_argument("--against", type=Path, nargs="+", default=None,
                        help="the models it was merged from, as given to --models")
    parser.add_argument("--ratios", type=finite_float, nargs="+", default=None,
                        help="their ratios, as given to the merge (B - A: --ratios 1 -1)")
    parser.add_argument("--lbws", type=finite_lbw, nargs="+", default=None, help="their block weights, if the merge had any")
    parser.add_argument("--clamp_quantile", type=float, default=None,
                        help="the merge's clamp quantile (default: read off the file)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the singular-value spectra per block, with the rank cuts (.png, .svg, .pdf)")
    parser.add_argument("--backend", type=str, default="auto", choices=list(BACKEND_CHOICES),
                        help="engine used to recompute the merge's float factors (default: auto)")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", force=True)
    if args.plot is not None:
        check_plot_path(args.plot)
    inspection = inspect_lora(args.lora, args.against, args.ratios, args.lbws, args.clamp_quantile, args.backend)
    print(f"{inspection.path}: {len(inspection.modules)} modules, saved as {inspection.dtype}")
    if inspection.fidelity is None:
        print(render_table(*rank_rows(inspection)))
        print("give --against (the merged models) and --ratios to measure it against the exact delta")
    else:
        settings = inspection.settings
        assert settings is not None
        source = "read off the file" if settings.inferred else "given"
        print(
            f"against the exact delta of {', '.join(str(p) for p in args.against)} (ratios "
            f"{', '.join(f'{r:g}' for r in args.ratios)}); clamp_quantile {settings.clamp_quantile:g} ({source}), "
            f"{'sqrt(S) split' if settings.sqrt_split else 'S on up'}"
        )
        print(format_table(block_summaries(inspection.fidelity), Summary("total", inspection.fidelity)))
    if args.plot is not None:
        plot_spectra(inspection.spectra, args.plot, title=inspection.path.name)
        print(f"spectra: {args.plot}")
    if inspection.fidelity is not None:
        print(totals_line(Summary("total", inspection.fidelity), inspection.dtype))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
