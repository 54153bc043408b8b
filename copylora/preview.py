"""`copylora preview`: a LoRA at several strengths, same seeds and prompts, made by kohya's own gen_img.py.

    python -m copylora.preview --sd-scripts DIR --base MODEL (--lora FILE | --loras FILE FILE ...) --out DIR
                               [--strengths 0 0.5 1] [--seeds 1 2 3] [--prompt TEXT ... | --prompts FILE]
                               [--width W --height H --steps N] [--python PY] [--sdxl] [--dry-run]
                               [-- GEN_IMG_ARGS ...]

Writes OUT/grid.png (one row per prompt, seed and LoRA, one column per strength, then the ΔE
heatmap of the strongest strength against strength 0; each cell captioned with its structure kept
and colour change), OUT/scores.json and scores.csv (every cell measured against strength 0 of its
prompt and seed: copylora/reports/image_measures.py), the single images in OUT/images/, the
heatmaps in OUT/differences/ and the prompts file gen_img read, OUT/prompts.txt. The last line
printed is the medians at each strength. Anything after `--` goes to gen_img.py unchanged
(offline: `-- --tokenizer_cache_dir DIR`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import run_cli, shown
from copylora.kohya import generate
from copylora.kohya import job as kohya_job
from copylora.kohya.checkout import find_checkout
from copylora.reports import grid, image_measures, preview_scores
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.preview"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG),
        usage="%(prog)s --sd-scripts DIR --base MODEL (--lora FILE | --loras FILE ...) --out DIR [options] "
              "[-- GEN_IMG_ARGS ...]",
        description="Pictures of a LoRA (or several) at several strengths with kohya's gen_img.py, each measured "
                    "against strength 0 (structure kept, colour change), in a labelled grid with the differences.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--sd-scripts", required=True, type=Path, metavar="DIR",
                        help="kohya-ss/sd-scripts checkout (or a Kohya's GUI folder with sd-scripts/ in it)")
    parser.add_argument("--base", required=True, type=Path, metavar="MODEL",
                        help="base model: .safetensors/.ckpt file or diffusers folder")
    loras = parser.add_mutually_exclusive_group(required=True)
    loras.add_argument("--lora", type=Path, metavar="FILE", help="the LoRA to look at")
    loras.add_argument("--loras", type=Path, nargs="+", metavar="FILE",
                       help="several LoRAs side by side (e.g. exact and clamped merge, rank 8 and 16): "
                            "one gen_img run, one grid, one scores table")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="gets grid.png, scores.json, scores.csv, images/, differences/ and prompts.txt")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0], metavar="M",
                        help="the LoRA's multipliers, one column each (negative allowed; 0, the reference, "
                             "is always made)")
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
                         args.loras or [args.lora], args.out, prompts, args.seeds, args.strengths, args.width or size,
                         args.height or size, args.steps, args.gen_img_args)


def _prompt_text(prompt: generate.Prompt) -> str:
    return " ".join(part for part in (prompt.text, prompt.options) if part)


def _row_label(job: generate.PreviewJob, cell: generate.Cell, several_prompts: bool) -> str:
    return (f"seed {cell.seed}" + (f"\n{cell.prompt.label[:24]}" if several_prompts else "")
            + (f"\n{cell.lora + 1}: {job.loras[cell.lora].stem[:21]}" if len(job.loras) > 1 else ""))


def render(job: generate.PreviewJob) -> tuple[Path, float]:
    """Run gen_img, measure every cell against strength 0 of its row and lay it all out, with the strongest
    strength's ΔE heatmap after each row; the grid's path and gen_img's seconds."""
    images, seconds = generate.generate(job)
    image_of = dict(zip(job.cells, images))
    strengths = [strength for _, strength in sorted({cell.column: cell.strength for cell in job.cells}.items())]
    strongest = max(strengths, key=lambda strength: (abs(strength), strength))
    several_prompts = len({cell.prompt for cell in job.cells}) > 1
    rows: dict[int, list[generate.Cell]] = {}
    for cell in job.cells:
        rows.setdefault(cell.row, []).append(cell)
    pictures, labels, captions, scores = [], [], [], []
    for row in rows.values():
        labels.append(_row_label(job, row[0], several_prompts))
        reference = image_measures.read_rgb(next(image_of[cell] for cell in row if cell.strength == 0))
        measured = [(cell, *image_measures.compare(reference, image_measures.read_rgb(image_of[cell]))) for cell in row]
        scores += [preview_scores.Score(_prompt_text(cell.prompt), cell.seed, str(job.loras[cell.lora]), cell.strength,
                                        str(image_of[cell]), measures) for cell, measures, _ in measured]
        pictures.append([image_of[cell] for cell in row])
        captions.append(["reference" if cell.strength == 0 else measures.headline for cell, measures, _ in measured])
        if strongest != 0:  # the difference column
            cell, measures, delta_e = next(item for item in measured if item[0].strength == strongest)
            pictures[-1].append(image_measures.write_png(image_measures.heatmap(delta_e),
                                                         job.differences_dir / image_of[cell].name))
            captions[-1].append(f"changed {measures.changed_share:.0%}")
    columns = [f"strength {strength:g}" for strength in strengths] + ([f"dE {strongest:g} vs 0"] if strongest else [])
    grid.contact_sheet(pictures, labels, columns, job.grid_path, captions)
    preview_scores.write(scores, job.out)
    return job.grid_path, seconds


def run(args: argparse.Namespace) -> int:
    job = plan(args)
    if args.dry_run:
        print(job.describe(), end="")
        return 0
    print(f"{shown(PROG)}: {len(job.shots)} images with kohya's {job.script} (prompts {job.prompts_path})", flush=True)
    try:
        path, seconds = render(job)
    except kohya_job.KohyaFailed as exc:
        print(f"{shown(PROG)}: error: {exc}", file=sys.stderr)
        return exc.code
    print(f"{shown(PROG)}: done in {seconds:.0f} s; single images in {job.images_dir}")
    print(path)
    print(f"{shown(PROG)}: {preview_scores.summary(preview_scores.read(job.out / 'scores.json'))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(parse(sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    sys.exit(main())
