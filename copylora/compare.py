"""`copylora compare`: did only the intended change happen between two pictures of the same size?

    python -m copylora.compare BEFORE AFTER [--json] [--out HEATMAP.png]

The measures `copylora preview` puts in its scores (copylora/reports/image_measures.py), for any two
images: e.g. the same seed at LoRA strength 0 and 1 from A1111, Forge or ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import CopyloraError, run_cli, shown
from copylora.reports import image_measures
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.compare"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG), formatter_class=DefaultsHelpFormatter,
        description="Structure kept (SSIM of L*), colour change (CIEDE2000 ΔE, signed chroma ΔC*) and the share of "
                    f"visibly changed pixels (ΔE > {image_measures.CHANGED_DELTA_E:g}) of AFTER against BEFORE.")
    parser.add_argument("before", type=Path, metavar="BEFORE", help="the reference picture, e.g. LoRA strength 0")
    parser.add_argument("after", type=Path, metavar="AFTER", help="the changed picture, same width and height")
    parser.add_argument("--json", action="store_true", help="print the measures as one JSON object")
    parser.add_argument("--out", type=Path, metavar="HEATMAP.png",
                        help=f"write the ΔE heatmap (black = unchanged, white = ΔE ≥ "
                             f"{image_measures.HEATMAP_FULL_SCALE:g})")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise CopyloraError(f"{args.out}: the heatmap is written as PNG; name it .png")
    if args.out is not None and args.out.resolve() in (args.before.resolve(), args.after.resolve()):
        raise CopyloraError(f"{args.out}: that is one of the pictures compared; write the heatmap elsewhere")
    before, after = image_measures.read_rgb(args.before), image_measures.read_rgb(args.after)
    if before.shape != after.shape:
        raise CopyloraError(f"{args.after}: {after.shape[1]}x{after.shape[0]} pixels, but {args.before} is "
                            f"{before.shape[1]}x{before.shape[0]}; compare pictures of the same size")
    try:
        measures, delta_e = image_measures.compare(before, after)
    except ValueError as exc:
        raise CopyloraError(f"{args.before}: {exc}") from exc
    if args.out is not None:
        image_measures.write_png(image_measures.heatmap(delta_e), args.out)
    if args.json:
        print(json.dumps({"before": str(args.before), "after": str(args.after), **measures.as_dict(),
                          "changed_delta_e": image_measures.CHANGED_DELTA_E}))
    else:
        lines = {"structure kept (SSIM of L*)": f"{measures.structure_kept:.3f}",
                 "colour change (mean ΔE00)": f"{measures.delta_e:.2f}",
                 "chroma change (mean ΔC*)": image_measures.signed(measures.delta_chroma, 2),
                 f"changed (ΔE > {image_measures.CHANGED_DELTA_E:g})": f"{measures.changed_share:.1%}"}
        width = max(map(len, lines))
        print("\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in lines.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
