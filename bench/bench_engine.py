"""Benchmark of the merge core (not a test): copylora._C vs the pure-torch loop vs stock's dense SVD.

    python bench/bench_engine.py [--quick] [--no-readme]

Synthetic LoRAs with every module of kohya's manifests (fp16 factors,
ratios 1 and -1, stock's 0.99 clamp), timed from ModuleJobs to merged float32 factors — file I/O
is bench_merge.py's business. Each engine case runs in a fresh process, so its peak RSS is its
own. Prints a table and rewrites the engine section of bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import manifest_modules  # noqa: E402

from copylora.engine import merge_jobs, reference  # noqa: E402
from copylora.engine.jobs import ModuleJob, SvdOptions  # noqa: E402
from copylora.runtime.command_process import keep_freed_memory  # noqa: E402

README = HERE / "README.md"
START, END = "<!-- engine:start -->", "<!-- engine:end -->"


def manifest_jobs(variant: str, input_ranks: list[int], new_rank: int, seed: int = 0) -> list[ModuleJob]:
    """One job per manifest module: len(input_ranks) random fp16 LoRAs with alternating ratios ±1."""
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for module in manifest_modules(variant):
        out, in_flat = module["up"][0], math.prod(module["down"][1:])
        ups = [(torch.randn(out, r, generator=gen) * 0.01).half() for r in input_ranks]
        downs = [(torch.randn(r, in_flat, generator=gen) * 0.05).half() for r in input_ranks]
        scales = [(-1.0) ** i * 1.0 / r for i, r in enumerate(input_ranks)]  # ratio · alpha/dim, alpha 1
        jobs.append(ModuleJob(module["name"], ups, downs, scales, new_rank))
    return jobs


def cost_units(jobs: list[ModuleJob]) -> float:
    """Σ (out + in) · R² over modules: what the factored method's work grows with."""
    return sum((j.out_features + j.in_features) * j.total_rank**2 for j in jobs)


def time_best(run: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_dense_stock(jobs: list[ModuleJob], sample_every: int) -> tuple[float, int]:
    """Stock's dense algorithm (W, full SVD, torch.quantile) on every sample_every-th module,
    scaled to all modules. Returns (estimated seconds, modules timed)."""
    sample = jobs[::sample_every]
    start = time.perf_counter()
    for job in sample:
        reference.dense_stock_merge(job)
    return (time.perf_counter() - start) * len(jobs) / len(sample), len(sample)


def child(args: argparse.Namespace) -> None:
    """One case in this fresh process: print seconds and peak RSS as JSON.

    "ext" and "torch" (batched per shape group) are the engine's backends; "torch-loop" is the
    reference one module at a time (the torch backend before it was batched); "torch-sort" is
    that loop clamping with torch.quantile (a full sort), the loop the engine was first measured
    against.
    """
    keep_freed_memory()  # the commands' heap setting (copylora.runtime.command_process)
    jobs = manifest_jobs(args.variant, [int(r) for r in args.ranks.split(",")], args.new_rank)
    options = SvdOptions()
    if args.backend in ("torch-loop", "torch-sort"):
        if args.backend == "torch-sort":
            reference.linear_quantile = torch.quantile
        run = lambda: [reference.merge_module(job, options) for job in jobs]  # noqa: E731
    else:
        run = lambda: merge_jobs(jobs, options, backend=args.backend)  # noqa: E731
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time_best(run, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "inputs_mb": setup_rss / 1024, "units": cost_units(jobs)}))


def run_case(variant: str, ranks: list[int], new_rank: int, backend: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--ranks", ",".join(map(str, ranks)),
               "--new-rank", str(new_rank), "--backend", backend, "--repeats", str(repeats)]
    # copylora's rows run as its commands run them: idle OpenMP threads sleep (set before torch loads,
    # unless the caller set a policy); the dense-stock estimate runs in this process, as stock does.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    return f"{model}, {torch.get_num_threads()} threads; torch {torch.__version__}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, small dense sample")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="sd15", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", default="8,8", help=argparse.SUPPRESS)
    parser.add_argument("--new-rank", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="ext", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    repeats = 2 if args.quick else 5
    rows = []

    def case(label: str, variant: str, ranks: list[int], new_rank: int, dense_every: int | None) -> None:
        ext = run_case(variant, ranks, new_rank, "ext", repeats)
        pure = run_case(variant, ranks, new_rank, "torch", 1 if args.quick else 2)
        loop = run_case(variant, ranks, new_rank, "torch-loop", 1 if args.quick else 2)
        sort = run_case(variant, ranks, new_rank, "torch-sort", 1) if ranks == [8, 8] else None
        dense = None
        if dense_every:
            dense, timed = time_dense_stock(manifest_jobs(variant, ranks, new_rank), dense_every)
        row = {
            "case": label,
            "ext": ext["seconds"],
            "torch": pure["seconds"],
            "speedup": pure["seconds"] / ext["seconds"],
            "loop": loop["seconds"],
            "sort": sort["seconds"] if sort else None,
            "dense": dense,
            "ext_rss": ext["peak_mb"],
            "inputs_mb": ext["inputs_mb"],
            "ns_per_unit": ext["seconds"] / ext["units"] * 1e9,
        }
        rows.append(row)
        print(
            f"{label:<32} ext {row['ext']:7.3f} s  torch {row['torch']:7.3f} s  ({row['speedup']:5.1f}x)  "
            f"torch loop {row['loop']:7.3f} s  "
            + (f"torch+sort {row['sort']:7.3f} s  " if row["sort"] else "")
            + (f"dense stock ~{dense:7.1f} s  " if dense else "")
            + f"peak RSS {row['ext_rss']:6.0f} MB  {row['ns_per_unit']:.3f} ns/unit",
            flush=True,
        )

    sample = 32 if args.quick else 8
    case("SD1.5 (264 modules), 8+8 → 16", "sd15", [8, 8], 16, sample)
    case("SD1.5 + conv (350), 8+8 → 16", "sd15_conv", [8, 8], 16, None)
    case("SDXL (986 modules), 8+8 → 16", "sdxl", [8, 8], 16, sample * 4)
    case("SDXL + conv (1052), 8+8 → 16", "sdxl_conv", [8, 8], 16, None)
    case("SD1.5, 32+32 → 64", "sd15", [32, 32], 64, None)
    case("SD1.5, 128+128 → 128", "sd15", [128, 128], 128, None)
    case("SD1.5, 10 LoRAs × 16 → 64", "sd15", [16] * 10, 64, None)

    if not args.no_readme:
        write_readme(rows, sample)


def write_readme(rows: list[dict], sample: int) -> None:
    lines = [
        START,
        "## Merge core (`bench/bench_engine.py`)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}; no GPU was lent to this run.",
        "Synthetic fp16 LoRAs with every module of the manifest, ratios 1/−1, 0.99 clamp; time from",
        "ModuleJobs to merged float32 factors (no file I/O), best of several runs; each engine case in",
        "a fresh process, peak RSS of that process (torch and the random inputs included; `inputs`",
        "is the RSS before merging). Dense stock = kohya's algorithm (dense W, full SVD,",
        f"torch.quantile) timed on every {sample}th module (SDXL: every {sample * 4}th) and scaled.",
        "pure torch = the torch backend, batched per shape group (torch's batched QR/SVD, O(n) quantile);",
        "torch loop = copylora's reference one module at a time (the torch backend before batching);",
        "loop + sort = that loop clamping with torch.quantile (a full sort), as a straightforward port would.",
        "ns/unit = ext seconds / Σ(out+in)·R² — flat or falling when cost follows the factored bound.",
        "copylora's columns run as its commands run them (idle OpenMP threads sleep, freed memory",
        "stays in the heap); the dense-stock estimate under torch's defaults, as stock runs.",
        "",
        "| case | ext (C++) | pure torch | speed-up | torch loop | loop + sort | dense stock (est.) | ext peak RSS | inputs | ns/unit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = f"{r['dense']:.0f} s" if r["dense"] else "—"
        sort = f"{r['sort']:.3f} s ({r['sort'] / r['ext']:.0f}×)" if r["sort"] else "—"
        lines.append(
            f"| {r['case']} | {r['ext']:.3f} s | {r['torch']:.3f} s | {r['speedup']:.1f}× | {r['loop']:.3f} s | {sort} | {dense} | "
            f"{r['ext_rss']:.0f} MB | {r['inputs_mb']:.0f} MB | {r['ns_per_unit']:.3f} |"
        )
    lines.append(END)
    section = "\n".join(lines)
    text = README.read_text() if README.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    README.write_text(text)
    print(f"wrote the engine section of {README}")


if __name__ == "__main__":
    main()
