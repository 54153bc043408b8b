"""The `copylora` console script: `copylora COMMAND ARGS…` runs `python -m copylora.COMMAND ARGS…`."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from copylora import __version__
from copylora.errors import run_by_console_script, run_cli

# command name -> module; each module has main(argv) -> int and works as `python -m copylora.<module>`
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("copylora.merge", "merge LoRAs like kohya's svd_merge_lora.py, fast"),
    "resize": ("copylora.resize", "resize a LoRA like kohya's resize_lora.py, fast"),
    "copy-machine": ("copylora.copy_machine", "train LoRA A and B with kohya, then write the edit's LoRA"),
    "preview": ("copylora.preview", "pictures of a LoRA at several strengths with kohya's gen_img.py, in a grid"),
    "compare": ("copylora.compare", "did only the change happen? structure kept and colour change of two pictures"),
    "train": ("copylora.train", "train one overfit LoRA with kohya's train_network.py"),
    "patch": ("copylora.patch", "make an sd-scripts checkout use copylora's merge (reversible)"),
    "inspect": ("copylora.inspect", "ranks, retained energy and spectra of a merged LoRA"),
    "doctor": ("copylora.doctor", "which backend runs here, and why"),
    "demo": ("copylora.demo", "make a synthetic A/B pair and merge it"),
    "gui": ("copylora.gui", "the copy-machine workflow in a local web page (needs the [gui] extra)"),
}


def usage() -> str:
    lines = ["usage: copylora COMMAND [ARGS...]   (or: copylora --version)", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Each command is also `python -m MODULE`; `copylora COMMAND --help` shows its options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("copylora", dispatch, sys.argv[1:] if argv is None else argv)


def dispatch(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name = args[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"copylora: error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    with run_by_console_script():
        return module.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
