"""`python -m copylora.merge`: kohya's networks/svd_merge_lora.py, same flags and output, fast.

    python -m copylora.merge --models B.safetensors A.safetensors --ratios 1 -1 \
        --new_rank 16 --device cuda --save_precision fp16 --save_to diff.safetensors
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
from copylora.formats.lora_file import LORA_FILE_TYPES
from copylora.pipelines.dynamic_rank import DYNAMIC_METHODS
from copylora.pipelines.svd_merge import PRECISIONS, MergeRequest, MergeSummary, merge_files
from copylora.runtime import command_process
from copylora.runtime.arg_types import finite_float, finite_lbw
from copylora.runtime.cli_help import DefaultsHelpFormatter
from copylora.runtime.progress import ModuleProgress

PROG = "copylora.merge"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG),
        description="Merge LoRAs by SVD like kohya's svd_merge_lora.py (same flags, same file format), "
        "computing each module's SVD from its factors instead of the dense weight.",
        formatter_class=DefaultsHelpFormatter,
    )
    precisions = list(PRECISIONS)
    # kohya's flags, defaults and choices
    parser.add_argument("--save_precision", type=str, default=None, choices=precisions,
                        help="precision of the saved file (default: same as --precision)")
    parser.add_argument("--precision", type=str, default="float", choices=precisions,
                        help="precision of the inputs during the merge (the SVD itself always runs in float32)")
    parser.add_argument("--save_to", type=str, default=None, help=f"output file: {LORA_FILE_TYPES} (required)")
    parser.add_argument("--models", type=str, nargs="*", help=f"LoRA files to merge: {LORA_FILE_TYPES} (required)")
    parser.add_argument("--ratios", type=finite_float, nargs="*", help="one ratio per model (B − A: --ratios 1 -1) (required)")
    parser.add_argument("--lbws", type=finite_lbw, nargs="*",
                        help="one block-weight JSON list per model, of length 12, 17, 20 or 26")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output LoRA")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of the output for 3x3 conv modules (default: same as --new_rank)")
    parser.add_argument("--device", type=str, default=None, help="where to compute: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not write sai modelspec metadata (the minimal ss_* metadata is always written)")
    # copylora's own options
    parser.add_argument("--backend", type=str, default="auto", choices=list(BACKEND_CHOICES),
                        help="merge engine: ext = the C++/CUDA extension, torch = pure torch; "
                        "auto = ext when it is built (default: auto)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clamp up/down at this quantile of their values, like stock (0.99); 1 = no clamp: "
                        "the exact delta when new_rank >= the inputs' total rank")
    parser.add_argument("--split_sv", action="store_true",
                        help="put sqrt(S) on both up and down instead of S on up (stock): better fp16 range for large deltas")
    parser.add_argument("--dynamic_method", type=str, default=None, choices=list(DYNAMIC_METHODS),
                        help="choose each module's rank from its singular values like resize_lora.py; "
                        "--new_rank / --new_conv_rank become the maximum")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="target of --dynamic_method: sv_ratio: largest/smallest kept value (>= 1); "
                        "sv_fro: fraction of the Frobenius norm kept; sv_cumulative: fraction of the sum of values kept")
    parser.add_argument("--per_module_alpha", action="store_true",
                        help="with --dynamic_method: write alpha = rank per module, as resize_lora.py does; by default "
                        "one alpha for all modules, each module's factor folded into its up (the same deltas; diffusers "
                        "loads only such files right)")
    parser.add_argument("--report", action="store_true",
                        help="measure the saved file against the exact delta and print the totals "
                        "(retained energy, clamp and rounding loss) in the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or INFO lines; only the summary")
    return parser


def request_from_args(args: argparse.Namespace) -> MergeRequest:
    return MergeRequest(
        models=[Path(m) for m in args.models or []],
        ratios=args.ratios,
        save_to=Path(args.save_to) if args.save_to else None,  # type: ignore[arg-type]
        new_rank=args.new_rank,
        new_conv_rank=args.new_conv_rank,
        lbws=args.lbws,
        precision=args.precision,
        save_precision=args.save_precision,
        device=args.device,
        no_metadata=args.no_metadata,
        backend=args.backend,
        clamp_quantile=args.clamp_quantile,
        sqrt_split=args.split_sv,
        dynamic_method=args.dynamic_method,
        dynamic_param=args.dynamic_param,
        per_module_alpha=args.per_module_alpha,
        report=args.report,
    )


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s", force=True)


def merge(args: argparse.Namespace) -> MergeSummary:
    """The merge these arguments ask for, with a progress bar unless --quiet."""
    configure_logging(args.quiet)
    request = request_from_args(args)
    with ModuleProgress("merging", disable=args.quiet) as progress:
        return merge_files(request, on_progress=progress)


def run(args: argparse.Namespace) -> int:
    print(merge(args).line())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    command_process.prepare()
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
