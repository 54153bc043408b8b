"""OUT.report.md: what `copylora copy-machine` did, for a person to open.

The training images side by side (OUT.training.png), the preview grid and its scores table when
there is one, each step's time, the merge's fidelity line, and every file and command involved.
"""

from __future__ import annotations

import argparse
import os
import shlex
from datetime import datetime
from pathlib import Path

from copylora.formats.lora_file import read_lora
from copylora.kohya.bake import BakeJob
from copylora.kohya.job import TrainJob
from copylora.reports import grid, image_measures, preview_scores


def _link(target: Path, report: Path) -> str:
    return Path(os.path.relpath(target, report.parent)).as_posix()


def write(
    args: argparse.Namespace,
    jobs: dict[str, TrainJob],
    baking: BakeJob | None,
    steps: dict[str, str],
    merge_argv: list[str] | None,
    fidelity: str | None,
    preview_grid: Path | None,
) -> Path:
    output: Path = args.output
    report = output.with_suffix(".report.md")
    pair = grid.contact_sheet([[jobs["A"].images[0].path, jobs["B"].images[0].path]], [""],
                              ["A (before)", "B (after)"], output.with_suffix(".training.png"))
    lora = read_lora(output)
    ranks = sorted({module.rank for module in lora.modules.values()})
    job = jobs["A"]
    method = ("subtract: LoRA A and LoRA B trained on the base, output = B - A (copylora's SVD merge)"
              if baking is None else
              "merged-base: A baked into the base with kohya's merge_lora.py, LoRA B trained on that, output = B")
    lines = [
        f"# copy-machine LoRA: {output.name}",
        "",
        f"- method: {method}",
        f"- output: `{output}` ({output.stat().st_size / 1e6:.1f} MB, {len(lora.modules)} LoRA modules, "
        f"rank {'/'.join(map(str, ranks))})",
        f"- fidelity: {fidelity or 'not measured'}",
        f"- written: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "## Training images",
        "",
        f"![A before, B after]({_link(pair, report)})",
        "",
    ]
    if preview_grid is not None:
        lines += ["## Preview (kohya's gen_img: base + this LoRA at each strength, same seed per row)", "",
                  f"![preview grid]({_link(preview_grid, report)})", "",
                  f"Single images: `{preview_grid.parent / 'images'}`", ""]
        scores = preview_scores.read(preview_grid.parent / "scores.json")
        lines += ["Each cell against strength 0 of its seed: structure kept (SSIM of L*, 1 = same composition), colour "
                  "change (mean CIEDE2000 ΔE), chroma change (ΔC*, negative = less colourful), share of pixels "
                  f"visibly changed (ΔE > {image_measures.CHANGED_DELTA_E:g}); the ΔE heatmaps are in the grid's "
                  f"last column (`{preview_grid.parent / 'scores.csv'}`).", "",
                  *preview_scores.markdown_table(scores), "",
                  "Medians" + preview_scores.summary(scores).removeprefix("medians") + ".", ""]
    lines += ["## Steps", "", "| step | time |", "|---|---|"]
    lines += [f"| {step} | {what} |" for step, what in steps.items()]
    lines += [
        "",
        "## Inputs and files",
        "",
        f"- base model: `{args.base}`",
        f"- kohya: `{job.sd_scripts}/{job.script}`, run by `{job.python}`",
        f"- preset: `{args.preset or 'default'}`" + "".join(f", `--set {s}`" for s in args.sets),
        "",
        "| LoRA | images | file | config |",
        "|---|---|---|---|",
    ]
    for label, item in jobs.items():
        images = "<br>".join(f"`{i.path}` {i.width}x{i.height} sha256 {i.sha256[:12]}" for i in item.images)
        lines.append(f"| {label} | {images} | `{item.lora_path}` | `{item.config_path}` |")
    lines.append("")
    if baking is not None:
        kept = "deleted" if not baking.output.exists() else "kept"
        lines.append(f"- merged checkpoint ({kept}): `{baking.output}`; `{shlex.join(baking.command)}`")
    if merge_argv is not None:
        lines.append(f"- merge: `python -m copylora.merge {shlex.join(merge_argv)}`")
    lines += [f"- warning: {warning}" for warning in job.config.warnings]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
