"""`copylora copy-machine`: from images A (before) and B (after) to the LoRA of the edit.

    python -m copylora.copy_machine --sd-scripts DIR --base MODEL --before A --after B --output OUT.safetensors
                                    [--method subtract|merged-base] [--new_rank 16] [--preset NAME|FILE] [--sdxl]
                                    [--set KEY=VALUE ...] [--accelerate-arg ARG ...] [--work-dir DIR]
                                    [--preview [--preview-args "ARGS"]] [--dry-run]

subtract (default): train LoRA A and LoRA B on the base (kohya, same preset and seed), then merge
B - A (`--ratios 1 -1`) with copylora's merge. merged-base: train A, bake it into the base with
kohya's merge_lora.py, train B on that checkpoint; B is the output. Either way OUT.report.md goes
beside OUT, and a rerun reuses every step whose inputs are unchanged, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import copylora.runtime.openmp_wait  # noqa: F401  (before torch loads OpenMP; kohya's scripts run without it)
from copylora import preview
from copylora.errors import CopyloraError, run_cli, shown
from copylora.kohya import bake as kohya_bake
from copylora.kohya import job as kohya_job
from copylora.pipelines.dynamic_rank import DYNAMIC_METHODS, validate_dynamic
from copylora.reports import copy_machine_report
from copylora.runtime import command_process
from copylora.runtime.cli_help import DefaultsHelpFormatter
from copylora.train import accelerate_args, add_kohya_arguments, setup, warn

PROG = "copylora.copy_machine"
METHODS = ("subtract", "merged-base")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG), description="Train LoRA A and LoRA B with kohya, then write the edit's LoRA.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_kohya_arguments(parser)
    parser.add_argument("--before", required=True, type=Path, metavar="A", help="the original image (or folder)")
    parser.add_argument("--after", required=True, type=Path, metavar="B", help="the edited image (or folder)")
    parser.add_argument("--output", required=True, type=Path, metavar="OUT.safetensors", help="the difference LoRA")
    parser.add_argument("--method", choices=METHODS, default="subtract",
                        help="subtract: train A and B on the base, write B - A (default); merged-base: bake A into "
                             "the base with kohya's merge_lora.py, train B on it, write B")
    parser.add_argument("--new_rank", "--new-rank", type=int, default=16, dest="new_rank",
                        help="subtract: rank of the merged LoRA (default 16: B - A of two rank-8 LoRAs, exactly)")
    parser.add_argument("--clamp_quantile", type=float, default=1.0,
                        help="subtract: 1 (default) writes the exact B - A; 0.99 clamps up/down at that quantile as "
                             "stock svd_merge_lora.py does (several %% of the difference lost)")
    parser.add_argument("--dynamic_method", choices=list(DYNAMIC_METHODS), default=None,
                        help="subtract: choose each module's rank from its singular values, as in `copylora merge`; "
                             "--new_rank becomes the maximum")
    parser.add_argument("--dynamic_param", type=float, default=None, help="subtract: the target of --dynamic_method")
    parser.add_argument("--device", default="cpu", help="subtract: device for the merge's SVD (default cpu)")
    parser.add_argument("--bake-precision", choices=list(kohya_bake.PRECISIONS), default="fp16",
                        help="merged-base: precision of the merged checkpoint (default fp16: half the disk of float)")
    parser.add_argument("--delete-merged-base", action="store_true",
                        help="merged-base: delete the merged checkpoint once B is trained (a rerun bakes it again "
                             "only if B must be retrained)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="where LoRA A and B, their configs, datasets and the merged checkpoint go "
                             "(default OUT's folder/OUT_work)")
    parser.add_argument("--preview", action="store_true",
                        help="at the end, run `copylora preview` on the output (kohya's gen_img.py) and put the grid "
                             "in the report")
    parser.add_argument("--preview-args", default="", metavar='"ARGS"',
                        help='more `copylora preview` options, one string, e.g. "--steps 8 --seeds 1 2 -- '
                             '--tokenizer_cache_dir DIR"')
    return parser


def merge(argv: list[str]):
    """copylora's merge, in this process, with svd_merge_lora.py's flags; its summary."""
    from copylora import merge as merge_cli  # loads the merge engine: only when a merge runs

    summary = merge_cli.merge(merge_cli.build_parser().parse_args(argv))
    print(summary.line(), flush=True)
    return summary


def merge_kind(args: argparse.Namespace) -> str:
    """The merge's settings as the report states them."""
    rank = f"rank {args.new_rank}"
    if args.dynamic_method:
        rank = f"rank up to {args.new_rank} by {args.dynamic_method} {args.dynamic_param}"
    if args.clamp_quantile == 1.0:
        return f"{rank}, the exact difference (no clamp)"
    return f"{rank}, clamped at the {args.clamp_quantile} quantile as stock svd_merge_lora.py"


def copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def train_or_reuse(label: str, job: kohya_job.TrainJob, steps: dict[str, str]) -> None:
    stamp = kohya_job.reusable(job)
    if stamp is not None:
        print(f"{shown(PROG)}: LoRA {label}: reusing {job.lora_path}: images and config unchanged since "
              f"{stamp['trained_at']}", flush=True)
        steps[f"LoRA {label}"] = f"reused (trained {stamp['trained_at']} in {stamp['seconds']} s)"
        return
    print(f"{shown(PROG)}: LoRA {label}: training with kohya's {job.script} (config {job.config_path})", flush=True)
    _, seconds = kohya_job.train(job)
    steps[f"LoRA {label}"] = f"trained in {seconds:.1f} s"


def preview_argv(args: argparse.Namespace, job: kohya_job.TrainJob, lora: Path, out: Path) -> list[str]:
    argv = ["--sd-scripts", str(job.sd_scripts), "--base", str(args.base), "--lora", str(lora), "--out", str(out),
            "--python", job.python, *(["--sdxl"] if args.sdxl else []), *shlex.split(args.preview_args)]
    preview.parse(argv)  # bad preview options stop us now, not after the training
    return argv


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.suffix != ".safetensors":
        raise CopyloraError(f"{output}: the output must be a .safetensors file")
    if args.new_rank < 1:
        raise CopyloraError(f"--new_rank {args.new_rank}: must be at least 1")
    if not 0.0 < args.clamp_quantile <= 1.0:
        raise CopyloraError(f"--clamp_quantile: must be in (0, 1], got {args.clamp_quantile}")
    validate_dynamic(args.dynamic_method, args.dynamic_param)  # before any training, not at the merge
    sd_scripts, python, options, preset = setup(args)
    work_dir = (args.work_dir or output.parent / f"{output.stem}_work").resolve()

    def plan(label: str, images: Path, base: Path, base_to_come: bool = False) -> kohya_job.TrainJob:
        return kohya_job.plan(sd_scripts, python, options, preset, args.sets, base, images, work_dir, label,
                              accelerate_args(args), base_to_come)

    jobs = {"A": plan("A", args.before, args.base)}
    baking = None
    if args.method == "merged-base":
        baking = kohya_bake.plan(sd_scripts, python, args.sdxl, args.base, jobs["A"].lora_path,
                                 work_dir / "A_merged.safetensors", args.bake_precision)
        jobs["B"] = plan("B", args.after, baking.output, base_to_come=True)
    else:
        jobs["B"] = plan("B", args.after, args.base)
    warn(shown(PROG), jobs["A"])
    merge_argv = [
        "--models", str(jobs["B"].lora_path), str(jobs["A"].lora_path), "--ratios", "1", "-1",
        "--new_rank", str(args.new_rank), "--save_precision", "fp16", "--save_to", str(output), "--device", args.device,
        "--clamp_quantile", str(args.clamp_quantile), "--report",
        *(["--dynamic_method", args.dynamic_method, "--dynamic_param", str(args.dynamic_param)] if args.dynamic_method else []),
    ]
    preview_out = output.parent / f"{output.stem}_preview"
    previewing = preview_argv(args, jobs["A"], output, preview_out) if args.preview else None
    if args.dry_run:
        print(f"# ---- LoRA A\n{jobs['A'].describe()}")
        if baking is not None:
            print(f"# ---- bake A into the base: {baking.output}\n{baking.describe()}")
        print(f"# ---- LoRA B\n{jobs['B'].describe()}")
        if baking is None:
            print(f"# ---- merge B - A\npython -m copylora.merge {shlex.join(merge_argv)}")
        else:
            print(f"# ---- output: a copy of {jobs['B'].lora_path}\n{output}")
        if previewing is not None:
            print(f"# ---- preview\npython -m copylora.preview {shlex.join(previewing)}")
        return 0

    steps: dict[str, str] = {}
    if baking is not None and not _b_is_settled(jobs, baking):
        kohya_bake.check_free_space(baking)  # before any training: the checkpoint is several GB
    step = "LoRA A"
    try:
        train_or_reuse("A", jobs["A"], steps)
        if baking is not None:
            step = "merged checkpoint"
            _bake_unless_settled(jobs, baking, steps)
        step = "LoRA B"
        train_or_reuse("B", jobs["B"], steps)
    except kohya_job.KohyaFailed as exc:
        print(f"{shown(PROG)}: error: {step}: {exc}; rerun to resume", file=sys.stderr)
        return exc.code

    started = time.monotonic()
    if baking is None:
        print(f"{shown(PROG)}: merging B - A into {output}", flush=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        fidelity = merge(merge_argv).fidelity
        steps["merge B - A"] = f"{time.monotonic() - started:.1f} s (copylora's merge, {merge_kind(args)})"
    else:
        copy_atomically(jobs["B"].lora_path, output)
        fidelity = "none lost: the output is LoRA B as kohya trained it (no SVD merge, no rank cut)"
        if args.delete_merged_base:
            kohya_bake.remove(baking)
            print(f"{shown(PROG)}: deleted the merged checkpoint {baking.output}", flush=True)
            steps["bake A into the base"] += "; deleted after B was trained"

    grid = None
    if previewing is not None:
        print(f"{shown(PROG)}: preview of {output}", flush=True)
        try:
            grid, seconds = preview.render(preview.plan(preview.parse(previewing)))
        except kohya_job.KohyaFailed as exc:
            print(f"{shown(PROG)}: error: preview: {exc}; the LoRA is written: {output}", file=sys.stderr)
            return exc.code
        steps["preview"] = f"{seconds:.1f} s (kohya's gen_img)"

    report = copy_machine_report.write(args, jobs, baking, steps, merge_argv if baking is None else None,
                                       fidelity, grid)
    print(f"{shown(PROG)}: report: {report}")
    print(output)
    return 0


def _b_is_settled(jobs: dict[str, kohya_job.TrainJob], baking: kohya_bake.BakeJob) -> bool:
    """True when A and B would both be reused, so no checkpoint needs to be baked (or kept)."""
    if kohya_job.reusable(jobs["A"]) is None:
        return False
    jobs["B"].base_fingerprint = baking.fingerprint()
    return kohya_job.reusable(jobs["B"]) is not None


def _bake_unless_settled(jobs: dict[str, kohya_job.TrainJob], baking: kohya_bake.BakeJob,
                         steps: dict[str, str]) -> None:
    """Bake A into the base, unless B trained on this very bake is there already, or the bake is."""
    fingerprint = baking.fingerprint()
    jobs["B"].base_fingerprint = fingerprint  # B changes whenever the checkpoint it trains on does
    if kohya_job.reusable(jobs["B"]) is not None:
        steps["bake A into the base"] = "not needed: LoRA B on this checkpoint is reused"
        return
    stamp = kohya_bake.reusable(baking, fingerprint)
    if stamp is not None:
        print(f"{shown(PROG)}: merged checkpoint: reusing {baking.output} (baked {stamp['baked_at']})", flush=True)
        steps["bake A into the base"] = f"reused (baked {stamp['baked_at']} in {stamp['seconds']} s)"
        return
    kohya_bake.check_free_space(baking)
    print(f"{shown(PROG)}: baking A into the base with kohya's {baking.script} -> {baking.output}", flush=True)
    seconds = kohya_bake.bake(baking, fingerprint)
    steps["bake A into the base"] = f"baked in {seconds:.1f} s ({baking.output}, " \
                                    f"{baking.output.stat().st_size / 1e9:.2f} GB)"


def main(argv: Sequence[str] | None = None) -> int:
    command_process.prepare()
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
