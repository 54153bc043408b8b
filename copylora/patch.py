"""`python -m copylora.patch install|uninstall|status --sd-scripts DIR`: make an sd-scripts checkout's
networks/svd_merge_lora.py and networks/resize_lora.py run copylora's merge and resize, and undo it
byte for byte."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import run_cli, shown
from copylora.kohya import checkout as sd_checkout
from copylora.kohya.job import default_python
from copylora.runtime import shell_words
from copylora.runtime.cli_help import RawDescriptionDefaultsHelpFormatter

EPILOG = """exit codes: install: 0 done, 1 installed but kohya's Python cannot import copylora yet (the
patched scripts run the originals until it can; the pip command to fix it is printed);
status: 0 every script is patched, 1 a script is not installed, 3 modified by someone else;
all: 2 bad input (not an sd-scripts folder, a refused install/uninstall)."""


PROG = "copylora.patch"

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG),
        description=(
            "Make an sd-scripts checkout (or the sd-scripts/ folder of a Kohya's GUI install) run "
            "copylora's merge and resize when `python networks/svd_merge_lora.py ...` or "
            "`python networks/resize_lora.py ...` is called. Each original script is kept beside it "
            "and runs instead whenever copylora cannot be imported."
        ),
        epilog=EPILOG,
        formatter_class=RawDescriptionDefaultsHelpFormatter,
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
    parser.add_argument(
        "--python",
        metavar="PYTHON",
        default=None,
        help="install: the Python that runs sd-scripts, checked for copylora (default: the checkout's "
        "venv, or Kohya's GUI's, else this Python)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    root = sd_checkout.find_checkout(args.sd_scripts)
    if args.action == "status":
        states = sd_checkout.statuses(root)
        for state in states:
            print(state.describe())
        return sd_checkout.status_exit_code(states)
    if args.action == "uninstall":
        print("\n".join(sd_checkout.uninstall_all(root, force=args.force)))
        return 0
    print("\n".join(sd_checkout.install_all(root, force=args.force)))
    # a name on PATH or a path relative to the caller's folder
    python = str(Path(shutil.which(args.python) or args.python).absolute()) if args.python else default_python(root)
    problem = sd_checkout.import_problem(python, root)
    if problem is not None:
        print(
            f"{shown(PROG)}: warning: {python} cannot import copylora ({problem}); until it can, the "
            f"patched scripts run the kept originals. Install it there: {sd_checkout.pip_install_command(python)}",
            file=sys.stderr,
        )
        return 1
    undo = f"{shown(PROG)} uninstall --sd-scripts {shell_words.quote(str(root))}"
    print(f"{python} imports copylora: the patched scripts run it (undo: {undo})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
