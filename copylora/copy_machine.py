"""`copylora copy-machine`: from images A (before) and B (after) to the LoRA of the edit, B - A.

    python -m copylora.copy_machine --sd-scripts DIR --base MODEL --before A --after B --output OUT.safetensors
                                    [--new_rank 16] [--preset NAME|FILE] [--sdxl] [--set KEY=VALUE ...]
                                    [--accelerate-arg ARG ...] [--work-dir DIR] [--dry-run]

Trains LoRA A and LoRA B with kohya (through copylora.train's adapter, same preset and seed), then
merges B - A (`--ratios 1 -1`) with copylora's merge, and writes OUT.report.md beside OUT. A rerun
reuses a trained LoRA whose images and config are unchanged, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from copylora.kohya import job as kohya_job
from copylora.errors import CopyloraError, run_cli
from copylora.lora_file import LoraFile, read_lora
from copylora.train import accelerate_args, add_kohya_arguments, setup, warn

PROG = "copylora.copy_machine"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train LoRA A and LoRA B with kohya, then write B - A.")
    add_kohya_arguments(parser)
    parser.add_argument("--before", required=True, type=Path, metavar="A", help="the original image (or folder)")
    parser.add_argument("--after", required=True, type=Path, metavar="B", help="the edited image (or folder)")
    parser.add_argument("--output", required=True, type=Path, metavar="OUT.safetensors", help="the difference LoRA")
    parser.add_argument("--new_rank", "--new-rank", type=int, default=16, dest="new_rank",
                        help="rank of the merged LoRA (default 16: B - A of two rank-8 LoRAs, exactly)")
    parser.add_argument("--device", default="cpu", help="device for the merge's SVD (default cpu)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="where LoRA A and B, their configs and datasets go (default OUT's folder/OUT_work)")
    return parser


def merge(argv: list[str]) -> int:
    """copylora's merge, in this process, with svd_merge_lora.py's flags."""
    from copylora.merge import main  # loads the merge engine: only when a merge runs

    return main(argv)


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.suffix != ".safetensors":
        raise CopyloraError(f"{output}: the output must be a .safetensors file")
    if args.new_rank < 1:
        raise CopyloraError(f"--new_rank {args.new_rank}: must be at least 1")
    sd_scripts, python, options, preset = setup(args)
    work_dir = args.work_dir or output.parent / f"{output.stem}_work"
    jobs = {
        label: kohya_job.plan(sd_scripts, python, options, preset, args.sets, args.base, images, work_dir, label,
                              accelerate_args(args))
        for label, images in (("A", args.before), ("B", args.after))
    }
    warn(PROG, jobs["A"])
    merge_argv = [
        "--models", str(jobs["B"].lora_path), str(jobs["A"].lora_path), "--ratios", "1", "-1",
        "--new_rank", str(args.new_rank), "--save_precision", "fp16", "--save_to", str(output), "--device", args.device,
    ]
    if args.dry_run:
        for label, job in jobs.items():
            print(f"# ---- LoRA {label}\n{job.describe()}")
        print(f"# ---- merge B - A\npython -m copylora.merge {shlex.join(merge_argv)}")
        return 0

    runs: dict[str, str] = {}
    for label, job in jobs.items():
        stamp = kohya_job.reusable(job)
        if stamp is not None:
            print(f"{PROG}: LoRA {label}: reusing {job.lora_path}: images and config unchanged since "
                  f"{stamp['trained_at']}", flush=True)
            runs[label] = f"reused (trained {stamp['trained_at']} in {stamp['seconds']} s)"
            continue
        print(f"{PROG}: LoRA {label}: training with kohya's {job.script} (config {job.config_path})", flush=True)
        try:
            _, seconds = kohya_job.train(job)
        except kohya_job.KohyaFailed as exc:
            print(f"{PROG}: error: LoRA {label}: {exc}; rerun to resume", file=sys.stderr)
            return exc.code
        runs[label] = f"trained in {seconds:.1f} s"

    print(f"{PROG}: merging B - A into {output}", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code = merge(merge_argv)
    merge_seconds = time.monotonic() - started
    if code != 0:
        print(f"{PROG}: error: the merge exited with code {code}", file=sys.stderr)
        return code
    merged = read_lora(output)
    report = output.with_suffix(".report.md")
    report.write_text(render_report(args, jobs, runs, merge_argv, merge_seconds, merged), encoding="utf-8")
    print(f"{PROG}: report: {report}")
    print(output)
    return 0


def render_report(
    args: argparse.Namespace,
    jobs: dict[str, kohya_job.TrainJob],
    runs: dict[str, str],
    merge_argv: list[str],
    merge_seconds: float,
    merged: LoraFile,
) -> str:
    ranks = sorted({module.rank for module in merged.modules.values()})
    job = jobs["A"]
    lines = [
        f"# copy-machine LoRA: {merged.path.name}",
        "",
        f"- written: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- output: `{merged.path}` ({merged.path.stat().st_size / 1e6:.1f} MB, {len(merged.modules)} LoRA modules, "
        f"rank {'/'.join(map(str, ranks))})",
        f"- base model: `{args.base}`",
        f"- kohya: `{job.sd_scripts}/{job.script}`, run by `{job.python}`",
        f"- preset: `{args.preset or 'default'}`" + "".join(f", `--set {s}`" for s in args.sets),
        "",
        "| LoRA | images | file | config | run |",
        "|---|---|---|---|---|",
    ]
    for label, item in jobs.items():
        images = "<br>".join(f"`{i.path}` {i.width}x{i.height} sha256 {i.sha256[:12]}" for i in item.images)
        lines.append(f"| {label} | {images} | `{item.lora_path}` | `{item.config_path}` | {runs[label]} |")
    lines += [
        "",
        f"- merge: `python -m copylora.merge {shlex.join(merge_argv)}` ({merge_seconds:.1f} s)",
    ]
    lines += [f"- warning: {warning}" for warning in job.config.warnings]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
