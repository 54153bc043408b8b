"""Dump the options of a kohya training script's parser as JSON (run by the kohya checkout's own Python).

usage: python -c "$(cat _probe.py)" SD_SCRIPTS_DIR SCRIPT.py OUT.json

copylora runs this file's text with `-c` (so that no copylora folder lands on sys.path), with the
Python that will train, so the options it validates a config against are those of the user's
checkout, whatever its version. It uses only the standard library besides what the script imports
itself (torch among them, asked whether CUDA works here).
The output has the layout of kohya's parser dumps in shared/kohya/: script, source, options.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def describe(action) -> dict:
    return {
        "flags": list(action.option_strings),
        "dest": action.dest,
        "action": type(action).__name__,
        "type": None if action.type is None else getattr(action.type, "__name__", str(action.type)),
        "nargs": action.nargs,
        "default": action.default,
        "choices": None if action.choices is None else list(action.choices),
    }


def main(argv: list[str]) -> int:
    sd_scripts, script, out = (os.path.abspath(arg) if i != 1 else arg for i, arg in enumerate(argv))
    os.chdir(sd_scripts)  # kohya's scripts expect to run from the checkout
    sys.path.insert(0, sd_scripts)
    module = importlib.import_module(os.path.splitext(script)[0])
    parser = module.setup_parser()
    import torch  # the script has imported it already

    dump = {
        "script": script,
        "source": f"{sd_scripts}: setup_parser() of {script}",
        "options": [describe(action) for action in parser._actions],
        "cuda": torch.cuda.is_available(),
    }
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(dump, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
