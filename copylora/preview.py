"""`copylora preview`: a LoRA at several strengths, same seeds and prompts, made by kohya's own gen_img.py.

    python -m copylora.preview --sd-scripts DIR --base MODEL --lora FILE --out DIR
                               [--strengths 0 0.5 1] [--seeds 1 2 3] [--prompt TEXT ... | --prompts FILE]
                               [--width W --height H --steps N] [--python PY] [--sdxl] [--dry-run]
                               [-- GEN_IMG_ARGS ...]

Writes OUT/grid.png (one row per prompt and seed, one column per strength, labelled), the single
images in OUT/images/ and the prompts file gen_img read, OUT/prompts.txt. Anything after `--` goes
to gen_img.py unchanged (offline: `-- --tokenizer_cache_dir DIR`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import run_cli
from copylora.kohya import generate
from copylora.kohya import job as kohya_job
from copylora.kohya.checkout import find_checkout
from copylora.reports import grid
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.preview"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, usage="%(prog)s --sd-scripts DIR --base MODEL --lora FILE --out DIR [options] [-- GEN_IMG_ARGS ...]",
        description="Pictures of a LoRA at several strengths with kohya's gen_img.py, and a labelled grid.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--sd-scripts", required=True, type=Path, metavar="DIR",
                        help="kohya-ss/sd-scripts checkout (or a Kohya's GUI folder with sd-scripts/ in it)")
    parser.add_argument("--base", required=True, type=Path, metavar="MODEL",
                        help="base model: .safetensors/.ckpt file or diffusers folder")
    parser.add_argument("--lora", required=True, type=Path, metavar="FILE", help="the LoRA to look at")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="gets grid.png, images/ and prompts.txt")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0], metavar="M",
                        help="the LoRA's multipliers, one column each (negative allowed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], metavar="SEED", help="one row each")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help='a prompt (repeatable; gen_img line options such as "--n NEGATIVE" allowed); '
                              'default: the empty prompt, the LoRA alone')
    prompts.add_argument("--prompts", type=Path, metavar="FILE",
                         help="a prompts file: one prompt per line, # comments (UTF-8)")
    parser.add_argument("--width", type=int, help="image width (default 512, SDXL 1024)")
    parser.add_argument("--height", type=int, help="image height (default 512, SDXL 1024)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--sdxl", action="store_true", help="generate with sdxl_gen_img.py")
    parser.add_argument("--python", metavar="PY", help="the Python that runs kohya (default DIR/venv's, else this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the prompts file; run nothing")
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """copylora's options, then everything after the first `--` as gen_img's."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.gen_img_args = argv[cut + 1:]
    return args


def plan(args: argparse.Namespace) -> generate.PreviewJob:
    sd_scripts = find_checkout(args.sd_scripts)
    if args.prompts is not None:
        prompts = generate.read_prompts(args.prompts)
    else:
        prompts = [generate.parse_prompt(text, f"--prompt {text!r}") for text in args.prompt or [""]]
    size = 1024 if args.sdxl else 512
    return generate.plan(sd_scripts, kohya_job.kohya_python(args.python, sd_scripts), args.sdxl, args.base,
                         args.lora, args.out, prompts, args.seeds, args.strengths, args.width or size,
                         args.height or size, args.steps, args.gen_img_args)


def render(job: generate.PreviewJob) -> tuple[Path, float]:
    """Run gen_img and lay the images out; the grid's path and gen_img's seconds."""
    images, seconds = generate.generate(job)
    strengths = sorted({cell.column: cell.strength for cell in job.cells}.items())
    several_prompts = len({cell.prompt for cell in job.cells}) > 1
    rows: dict[int, list[Path]] = {}
    labels: dict[int, str] = {}
    for cell, image in zip(job.cells, images):
        rows.setdefault(cell.row, []).append(image)
        labels[cell.row] = f"seed {cell.seed}" + (f"\n{cell.prompt.label[:24]}" if several_prompts else "")
    grid.contact_sheet([rows[r] for r in sorted(rows)], [labels[r] for r in sorted(rows)],
                       [f"strength {strength:g}" for _, strength in strengths], job.grid_path)
    return job.grid_path, seconds


def run(args: argparse.Namespace) -> int:
    job = plan(args)
    if args.dry_run:
        print(job.describe(), end="")
        return 0
    print(f"{PROG}: {len(job.cells)} images with kohya's {job.script} (prompts {job.prompts_path})", flush=True)
    try:
        path, seconds = render(job)
    except kohya_job.KohyaFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    print(f"{PROG}: done in {seconds:.0f} s; single images in {job.images_dir}")
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(parse(sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    sys.exit(main())
