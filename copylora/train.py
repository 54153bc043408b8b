"""`copylora train`: train one overfit LoRA with kohya's own train_network.py (or sdxl_train_network.py).

    python -m copylora.train --sd-scripts DIR --base MODEL --images PATH --output-dir DIR --name NAME
                             [--preset NAME|FILE] [--sdxl] [--set KEY=VALUE ...] [--accelerate-arg ARG ...]
                             [--python PY] [--kohya-args JSON] [--dry-run]

Lays out the dataset (no caption; repeats from the preset), writes OUTPUT_DIR/NAME.toml, runs
`accelerate launch SCRIPT --config_file NAME.toml` in DIR, and prints the LoRA's path.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import CopyloraError, run_cli, shown
from copylora.kohya import job as kohya_job
from copylora.kohya.checkout import find_checkout
from copylora.kohya.options import KohyaOptions, Preset, load_preset, preset_path
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.train"


def add_kohya_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `train` and `copy-machine` share."""
    parser.add_argument("--sd-scripts", required=True, type=Path, metavar="DIR",
                        help="kohya-ss/sd-scripts checkout (or a Kohya's GUI folder with sd-scripts/ in it)")
    parser.add_argument("--base", required=True, type=Path, metavar="MODEL",
                        help="base model: .safetensors/.ckpt file or diffusers folder")
    parser.add_argument("--preset", metavar="NAME|FILE",
                        help="configs/NAME.toml or a TOML file (default copy_machine_sd15, or copy_machine_sdxl with --sdxl)")
    parser.add_argument("--sdxl", action="store_true", help="train with sdxl_train_network.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override a config key (VALUE read as TOML, else as text; KEY= removes the key); repeatable")
    parser.add_argument("--accelerate-arg", action="append", default=[], metavar="ARG", dest="accelerate_args",
                        help='argument(s) for accelerate launch, e.g. --accelerate-arg="--num_processes 2"; repeatable')
    parser.add_argument("--python", metavar="PY",
                        help="the Python that runs kohya (default DIR/venv's, else this one)")
    parser.add_argument("--kohya-args", type=Path, metavar="JSON",
                        help="a dump of the script's parser options to check keys against "
                             "(default: ask the script's setup_parser() with PY)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and print the command and TOML; train nothing, write nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG), description="Train one overfit LoRA with kohya's train_network.py.", formatter_class=DefaultsHelpFormatter
    )
    add_kohya_arguments(parser)
    parser.add_argument("--images", required=True, type=Path, metavar="PATH", help="one image, or a folder of images")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="gets NAME.safetensors, NAME.toml and NAME_dataset/")
    parser.add_argument("--name", required=True, help="output name (no extension)")
    return parser


def setup(args: argparse.Namespace) -> tuple[Path, str, KohyaOptions, Preset]:
    """The checkout, its Python, the preset and the target script's options."""
    sd_scripts = find_checkout(args.sd_scripts)
    python = kohya_job.kohya_python(args.python, sd_scripts)
    preset = load_preset(preset_path(args.preset, args.sdxl), args.sdxl)
    script = sd_scripts / preset.script
    if not script.is_file():
        raise CopyloraError(f"{script}: not in this checkout (too old an sd-scripts?)")
    return sd_scripts, python, kohya_job.kohya_options(sd_scripts, python, preset.script, args.kohya_args), preset


def accelerate_args(args: argparse.Namespace) -> list[str]:
    return [part for arg in args.accelerate_args for part in shlex.split(arg)]


def warn(prog: str, job: kohya_job.TrainJob) -> None:
    for warning in job.config.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    sd_scripts, python, options, preset = setup(args)
    job = kohya_job.plan(sd_scripts, python, options, preset, args.sets, args.base, args.images,
                         args.output_dir, args.name, accelerate_args(args))
    warn(shown(PROG), job)
    if args.dry_run:
        print(job.describe(), end="")
        return 0
    print(f"{shown(PROG)}: training {job.lora_path} with kohya's {job.script} (config {job.config_path})", flush=True)
    try:
        lora, seconds = kohya_job.train(job)
    except kohya_job.KohyaFailed as exc:
        print(f"{shown(PROG)}: error: {exc}", file=sys.stderr)
        return exc.code
    ranks = sorted({module.rank for module in lora.modules.values()})
    print(f"{shown(PROG)}: done in {seconds:.0f} s: {len(lora.modules)} LoRA modules, rank {'/'.join(map(str, ranks))}")
    print(job.lora_path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
