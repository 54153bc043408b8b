"""`python -m copylora.demo`: write a synthetic SD1.5 A/B pair and merge B − A, like the real job.

Needs no files of your own: it shows the whole merge (and which backend ran) on a fresh machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from copylora import merge
from copylora.errors import CopyloraError, run_cli, shown
from copylora.formats.synthetic import write_sd15_pair
from copylora.runtime import shell_words
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=shown(PROG), description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("copylora-demo"), help="folder for A, B and the difference")
    parser.add_argument("--new_rank", type=int, default=16, help="rank of the difference LoRA")
    parser.add_argument("--backend", default="auto", help="merge engine, as in copylora.merge")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic pair")
    return parser


def output_folder(out: Path) -> Path:
    """--out as a folder that exists, or one line saying why it cannot be one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CopyloraError(f"--out {out}: a file is in the way; give a folder (new or existing)") from None
    except OSError as exc:
        raise CopyloraError(f"--out {out}: cannot create the folder: {exc.strerror}") from None
    return out


def run(args: argparse.Namespace) -> int:
    before, after = write_sd15_pair(output_folder(args.out), seed=args.seed)
    print(f"wrote synthetic SD1.5 LoRAs (264 modules, dim 8, alpha 1): {before}, {after}")
    merge_args = [
        "--models", str(after), str(before), "--ratios", "1", "-1",
        "--new_rank", str(args.new_rank), "--save_precision", "fp16",
        "--save_to", str(args.out / "difference.safetensors"), "--backend", args.backend,
    ]
    print("python -m copylora.merge " + shell_words.join(merge_args))
    code = merge.run(merge.build_parser().parse_args(merge_args))
    difference = shell_words.quote(str(args.out / "difference.safetensors"))
    pair = shell_words.join([after, before])
    print(
        f"\n{difference} is B - A as stock svd_merge_lora.py writes it (0.99-quantile clamp, fp16).\n"
        "Next: how much of the exact difference it keeps, per block:\n"
        f"  copylora inspect {difference} --against {pair} --ratios 1 -1\n"
        "and the exact difference (no clamp), as copylora's copy-machine writes it:\n"
        f"  copylora merge --models {pair} --ratios 1 -1 --new_rank {args.new_rank} --save_precision fp16 "
        f"--clamp_quantile 1 --save_to {shell_words.quote(str(args.out / 'exact.safetensors'))}"
    )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
