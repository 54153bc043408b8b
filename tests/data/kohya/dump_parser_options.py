"""Dump the argparse options of a kohya script's `setup_parser()` as JSON (the `*_args.json` layout).

    python tests/data/kohya/dump_parser_options.py SCRIPT.py --source "kohya-ss/sd-scripts <commit>" > OUT.json

SCRIPT.py is imported as a module (not run as __main__), so run this with the Python of an sd-scripts
venv, from the checkout root, when the script imports kohya's library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys


def option_record(action: argparse.Action) -> dict:
    return {
        "flags": list(action.option_strings),
        "dest": action.dest,
        "action": type(action).__name__,
        "type": getattr(action.type, "__name__", None),
        "nargs": action.nargs,
        "default": action.default,
        "choices": list(action.choices) if action.choices is not None else None,
    }


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("script", help="a .py file defining setup_parser()")
    cli.add_argument("--source", required=True, help="where the script came from (repository and commit)")
    args = cli.parse_args()
    sys.path[:0] = [os.path.dirname(os.path.abspath(args.script)), os.getcwd()]  # as `python networks/x.py` sees it
    spec = importlib.util.spec_from_file_location("kohya_script", args.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.setup_parser()
    dump = {
        "script": os.path.basename(args.script),
        "source": f"{args.source}, argparse parser dumped from setup_parser()",
        "options": [option_record(a) for a in parser._actions],
    }
    json.dump(dump, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
