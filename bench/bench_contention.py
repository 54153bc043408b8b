"""The merge on a busy CPU (not a test): whole-process time with N busy background processes.

A user merges while a training run or a web UI keeps the cores busy. For N = 0, 1, 2 busy
processes (each a pure-Python spin loop that ends by itself after --busy-limit seconds and is
killed when the case ends), best of --repeat fresh processes, on the real SD1.5 pair:
- copylora.merge with each backend, as shipped (idle OpenMP threads sleep: copylora.runtime.openmp_wait);
- the same with libgomp's default spin-then-sleep policy (torch imported before copylora, so the
  setting comes too late: what every release before it did);
- the I/O floor (import torch, load the inputs, write a file of the output's size) under the same
  load: a process that shares busy cores slows down whatever it does.

    python bench/bench_contention.py [--busy 0 1 2] [--repeat 3] [--write]

--write replaces the "contention" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common import IO_FLOOR, REAL_PAIR, engine_seconds, machine, with_io_floor, write_section

MERGE_ARGS = ["--ratios", "1", "-1", "--new_rank", "16", "--device", "cpu", "--save_precision", "fp16", "--quiet"]
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
# `python -m copylora.merge` with torch (and so libgomp) loaded first: the default wait policy
SPINNING = "import runpy, sys, torch\nsys.argv[0] = 'copylora.merge'\nrunpy.run_module('copylora.merge', run_name='__main__')\n"


@contextmanager
def busy_processes(count: int, limit_seconds: float) -> Iterator[None]:
    """`count` single-threaded spin loops, each ending by itself after limit_seconds, killed on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(limit_seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="numbers of busy processes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy-limit", type=float, default=600.0, help="seconds after which a busy loop ends anyway")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    models = [str(REAL_PAIR / "B.safetensors"), str(REAL_PAIR / "A.safetensors")]

    lines = [
        f"Real SD1.5 pair, B − A `--new_rank 16 --save_precision fp16 --device cpu`, best of {args.repeat} fresh "
        f"processes in interleaved rounds while N single-threaded busy loops run. Machine: {machine()}. "
        f"Measured {datetime.date.today()}.",
        "",
        "| busy processes | command | wall s | × floor under the same load | engine s |",
        "|---:|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "diff.safetensors")
        for count in args.busy:
            with busy_processes(count, args.busy_limit):
                commands = {
                    f"copylora.merge --backend {backend}{label}": [
                        sys.executable, *prefix, "--models", *models, *MERGE_ARGS, "--save_to", out, "--backend", backend
                    ]
                    for backend in ("ext", "torch")
                    for label, prefix in (("", ["-m", "copylora.merge"]), (" (default spin policy)", ["-c", SPINNING]))
                }
                measured = with_io_floor(commands, models, Path(out), Path(tmp), args.repeat)
            floor = measured.pop(IO_FLOOR)
            lines.append(f"| {count} | {IO_FLOOR} | {floor.seconds:.2f} | 1.00 | – |")
            for label, run in measured.items():
                lines.append(f"| {count} | {label} | {run.seconds:.2f} | {run.seconds / floor.seconds:.2f} | "
                             f"{engine_seconds(run.stdout):.3f} |")
            print("\n".join(lines[-5:]), flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("contention", "Busy CPU (`bench/bench_contention.py`)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
