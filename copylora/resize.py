"""`python -m copylora.resize`: kohya's networks/resize_lora.py, same flags and output, fast.

    python -m copylora.resize --model diff.safetensors --new_rank 8 \
        --dynamic_method sv_fro --dynamic_param 0.99 --save_precision fp16 --save_to small.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import copylora.runtime.openmp_wait  # noqa: F401  (before torch loads OpenMP)
from copylora.engine import BACKEND_CHOICES
from copylora.errors import run_cli, shown
from copylora.merge import configure_logging
from copylora.pipelines.dynamic_rank import DYNAMIC_METHODS
from copylora.pipelines.svd_merge import PRECISIONS
from copylora.pipelines.svd_resize import ResizedModule, ResizeRequest, ResizeSummary, resize_file
from copylora.runtime import command_process
from copylora.runtime.cli_help import DefaultsHelpFormatter
from copylora.runtime.progress import ModuleProgress

PROG = "copylora.resize"


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG),
        description="Resize a LoRA like kohya's resize_lora.py (same flags, same file format), "
        "computing each module's SVD from its factors instead of the dense weight.",
        formatter_class=DefaultsHelpFormatter,
    )
    # kohya's flags, defaults and choices
    parser.add_argument("--save_precision", type=str, default=None, choices=list(PRECISIONS),
                        help="precision of the saved file (every tensor) (default: float)")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank of the output LoRA; the maximum with --dynamic_method")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank for conv modules (every 4-D module, 1x1 included) (default: same as --new_rank)")
    parser.add_argument("--save_to", type=str, default=None, help="output file: .safetensors, .ckpt, .pt or .pth (required)")
    parser.add_argument("--model", type=str, default=None,
                        help="LoRA to resize: .safetensors, .ckpt, .pt, .pth (kohya, PEFT or ControlLoRA names; a LoHa or "
                        "LoKr comes out a plain LoRA) (required)")
    parser.add_argument("--device", type=str, default=None, help="where to compute: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--verbose", action="store_true",
                        help="print each module's retained sum and Frobenius norm of its singular values")
    parser.add_argument("--dynamic_method", type=str, default=None, choices=list(DYNAMIC_METHODS),
                        help="choose each module's rank from its singular values; --new_rank / --new_conv_rank "
                        "become the maximum")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="target of --dynamic_method: sv_ratio: largest/smallest kept value (>= 1); "
                        "sv_fro: fraction of the Frobenius norm kept; sv_cumulative: fraction of the sum of values kept")
    parser.add_argument("--svd_lowrank_niter", type=non_negative_int, default=2,
                        help="accepted as newer resize_lora.py accepts it (Kohya's GUI always passes it); changes "
                        "nothing: kohya uses it for a randomised svd_lowrank of large dense matrices, copylora's SVD "
                        "is exact, computed from the factors")
    # copylora's own options
    parser.add_argument("--backend", type=str, default="auto", choices=list(BACKEND_CHOICES),
                        help="engine: ext = the C++/CUDA extension, torch = pure torch; auto = ext when it is built")
    parser.add_argument("--uniform_alpha", action="store_true",
                        help="write one alpha for every module and fold each module's own factor into lora_up "
                        "(same deltas; dynamic-rank files then load right in diffusers too)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or INFO lines; only the summary")
    return parser


def request_from_args(args: argparse.Namespace) -> ResizeRequest:
    return ResizeRequest(
        model=Path(args.model) if args.model else None,  # type: ignore[arg-type]
        save_to=Path(args.save_to) if args.save_to else None,  # type: ignore[arg-type]
        new_rank=args.new_rank,
        new_conv_rank=args.new_conv_rank,
        save_precision=args.save_precision,
        device=args.device,
        dynamic_method=args.dynamic_method,
        dynamic_param=args.dynamic_param,
        backend=args.backend,
        uniform_alpha=args.uniform_alpha,
    )


def retention_line(module: ResizedModule) -> str:
    return (
        f"{module.name}: rank {module.rank}, alpha {module.alpha:g}; kept {module.sum_retained:.1%} of sum(S), "
        f"{module.fro_retained:.1%} of the Frobenius norm; S[0]/S[rank-1] = {module.max_ratio:.1f}"
    )


def retention_report(summary: ResizeSummary) -> list[str]:
    """--verbose: per module and on average, what resize_lora.py reports (same definitions)."""
    lines = [retention_line(m) for m in summary.modules]
    fro = [m.fro_retained for m in summary.modules if m.fro_retained == m.fro_retained]  # all-zero: NaN, left out
    if fro:
        lines.append(f"Frobenius norm retained: mean {statistics.fmean(fro):.2%}, std {statistics.pstdev(fro):.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    configure_logging(args.quiet)
    with ModuleProgress("resizing", disable=args.quiet) as progress:
        summary = resize_file(request_from_args(args), on_progress=progress)
    if args.verbose:
        print("\n".join(retention_report(summary)))
    print(summary.line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command_process.prepare()
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
