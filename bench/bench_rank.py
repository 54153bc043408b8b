"""How the merge core's cost grows with the total rank R (not a test): the rank-scaling table.

    python bench/bench_rank.py [--ranks 16 64 256 1024] [--per-shape 2] [--write]

For SDXL and FLUX.1 (kohya's manifests: each distinct module shape, `--per-shape` modules of it),
B − A of two random fp16 LoRAs of rank R/2 each, merged to rank 16 with stock's 0.99 clamp. Per R:
the engine (`merge_jobs`, backend ext, in this process, best of a few runs; wall and CPU seconds:
on a shared machine the CPU seconds are the steadier measure of work), CPU seconds per unit of
Σ(out+in)·R² (flat when the cost follows the factored bound; the R×R core SVD's R³ shows at large
R, and shapes with R ≥ min(out, in) go dense), and the decomposition alone
(`copylora::factored_svd` on the stacked factors, one call per shape, one thread, CPU seconds) by
the Cholesky-QR route (`qr`, the engine before issue 22) and by the Gram route (`gram`, forced: the
modules it declines are redone by Cholesky-QR, as in the engine), and the routes the engine takes
(`auto`).
--write puts the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from common import machine, manifest_modules, write_section  # noqa: E402

from copylora.engine import merge_jobs, ops, reference  # noqa: E402
from copylora.engine.jobs import ModuleJob, SvdOptions  # noqa: E402
from copylora.runtime.command_process import keep_freed_memory  # noqa: E402

FAMILIES = {"SDXL": ("sdxl", ""), "FLUX.1": ("flux1", "lora_unet")}  # manifest, module name prefix
ROUTES = {0: "dense", 1: "Gram", 2: "CholQR2", 3: "Householder"}


def shape_jobs(variant: str, prefix: str, rank: int, per_shape: int, seed: int = 0) -> list[ModuleJob]:
    """per_shape B − A jobs (two random fp16 LoRAs of rank/2) for each distinct module shape."""
    shapes = sorted({(m["up"][0], math.prod(m["down"][1:])) for m in manifest_modules(variant)
                     if m["name"].startswith(prefix)})
    gen = torch.Generator().manual_seed(seed)
    half = rank // 2
    jobs = []
    for out, in_features in shapes:
        for index in range(per_shape):
            ups = [(torch.randn(out, half, generator=gen) * 0.01).half() for _ in range(2)]
            downs = [(torch.randn(half, in_features, generator=gen) / in_features**0.5).half() for _ in range(2)]
            jobs.append(ModuleJob(f"{out}x{in_features}_{index}", ups, downs, [1.0 / half, -1.0 / half], 16))
    return jobs


def best_of(run, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of `repeats` runs."""
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def decomposition(jobs: list[ModuleJob], method: str) -> tuple[float, Counter]:
    """CPU seconds of copylora::factored_svd (one thread) over every shape's stacked factors, and the
    routes taken."""
    batches = {}
    for job in jobs:
        batches.setdefault(job.group_key(), []).append(job)
    stacked = [(reference.stacked_batch(group), group[0].rank) for group in batches.values()]
    routes: Counter = Counter()
    start = time.process_time()
    for (p, q), kept in stacked:
        routes.update(torch.ops.copylora.factored_svd(p, q, kept, method)[3].tolist())
    return time.process_time() - start, routes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--per-shape", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not ops.load_status().available:
        raise SystemExit(f"copylora._C did not load: {ops.load_status().error}")
    keep_freed_memory()
    rows, shape_counts = [], []
    for family, (variant, prefix) in FAMILIES.items():
        shape_counts.append(f"{family}: {len(shape_jobs(variant, prefix, 2, 1))} shapes")
        for rank in args.ranks:
            jobs = shape_jobs(variant, prefix, rank, args.per_shape)
            units = sum((j.out_features + j.in_features) * j.total_rank**2 for j in jobs)
            repeats = 3 if rank <= 256 else 1
            wall, cpu = best_of(lambda: merge_jobs(jobs, SvdOptions(), backend="ext"), repeats)
            qr_seconds, _ = decomposition(jobs, "qr")
            gram_seconds, _ = decomposition(jobs, "gram")
            _, routes = decomposition(jobs, "auto")
            taken = ", ".join(f"{ROUTES[r]} {n}" for r, n in sorted(routes.items()))
            row = (f"| {family} | {rank} | {len(jobs)} | {wall:.3f} | {cpu:.3f} | {cpu / units * 1e9:.3f} "
                   f"| {qr_seconds:.3f} | {gram_seconds:.3f} | {taken} |")
            print(row, flush=True)
            rows.append(row)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = "\n".join([
        f"B − A of two random fp16 LoRAs of rank R/2 → rank 16, 0.99 clamp; {args.per_shape} modules of each "
        f"distinct shape of kohya's manifest ({', '.join(shape_counts)}; FLUX.1's U-Net modules of lora_flux). "
        f"Machine: {machine()}. Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"load average {load} (1, 5, 15 min) at the end.",
        "",
        "| family | R | modules | engine wall s | engine CPU s | CPU ns / Σ(out+in)·R² | decomposition by CholQR2, "
        "CPU s | decomposition by the Gram route, CPU s | routes the engine takes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ])
    print(table)
    if args.write:
        write_section("rank", "Cost against rank (`bench/bench_rank.py`)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
