"""`python -m copylora.patch install|uninstall|status --sd-scripts DIR`: make an sd-scripts checkout's
networks/svd_merge_lora.py run copylora's merge, and undo it byte for byte."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from copylora.kohya import checkout as sd_checkout
from copylora.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m copylora.patch",
        description=(
            "Make an sd-scripts checkout (or the sd-scripts/ folder of a Kohya's GUI install) run "
            "copylora's merge when `python networks/svd_merge_lora.py ...` is called. The original "
            "script is kept beside it and runs instead whenever copylora cannot be imported."
        ),
    )
    parser.add_argument(
        "action",
        choices=["install", "uninstall", "status"],
        help="install the shim, restore the original byte for byte, or say which is in place",
    )
    parser.add_argument(
        "--sd-scripts",
        dest="sd_scripts",
        metavar="DIR",
        default=".",
        help="an sd-scripts checkout, or a Kohya's GUI folder containing sd-scripts/ (default: current folder)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="install/uninstall even if the shim or the kept original were changed by someone else",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    root = sd_checkout.find_checkout(args.sd_scripts)
    if args.action == "status":
        print(sd_checkout.inspect(root).describe())
    elif args.action == "install":
        print(sd_checkout.install(root, force=args.force))
    else:
        print(sd_checkout.uninstall(root, force=args.force))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("copylora.patch", lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
