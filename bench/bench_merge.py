"""Whole-process benchmark of `copylora.merge` on the shared real SD1.5 pair (not a test).

Measures, each in a fresh process (wall time and peak RSS from wait4):
- copylora.merge with each backend (the merge core's own time is read from its last line);
- the I/O floor: a process that imports torch, loads the inputs with safetensors and writes
  a file of the output's size — no merge can beat it;
- optionally stock sd-scripts (`--sd-scripts DIR --stock-python PY`).

    python bench/bench_merge.py [--repeat 3] [--sd-scripts DIR --stock-python PY] [--write]

--write replaces the "merge" section of bench/README.md with the table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PAIR = REPO.parent / "shared" / "golden" / "real_sd15"
MERGE_ARGS = ["--ratios", "1", "-1", "--new_rank", "16", "--device", "cpu", "--save_precision", "fp16"]
README = REPO / "bench" / "README.md"
START, END = "<!-- merge:start -->", "<!-- merge:end -->"

FLOOR = """
import sys, torch
from safetensors.torch import load_file, save_file
inputs = [load_file(p) for p in sys.argv[1:-2]]
n = int(sys.argv[-1]) // 2
save_file({"x": torch.zeros(n, dtype=torch.float16)}, sys.argv[-2])
"""


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    stdout: str


def timed(cmd: list[str], cwd: Path | None = None) -> Run:
    start = datetime.datetime.now()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = (datetime.datetime.now() - start).total_seconds()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return Run(seconds, usage.ru_maxrss / 1024, stdout)


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def engine_seconds(stdout: str) -> float:
    match = re.search(r"\(engine ([0-9.]+) s\)", stdout)
    return float(match.group(1)) if match else float("nan")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sd-scripts", type=Path, help="an sd-scripts checkout, to time the stock script too")
    parser.add_argument("--stock-python", type=str, help="the Python that can run sd-scripts")
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    models = [str(PAIR / "B.safetensors"), str(PAIR / "A.safetensors")]

    rows: list[tuple[str, Run, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "diff.safetensors")
        for backend in ("ext", "torch"):
            cmd = [sys.executable, "-m", "copylora.merge", "--models", *models, *MERGE_ARGS,
                   "--save_to", out, "--backend", backend, "--quiet"]
            run = best([timed(cmd) for _ in range(args.repeat)])
            rows.append((f"copylora.merge --backend {backend}", run, engine_seconds(run.stdout)))
        size = Path(out).stat().st_size
        floor = best([timed([sys.executable, "-c", FLOOR, *models, str(Path(tmp) / "floor.safetensors"), str(size)])
                      for _ in range(args.repeat)])
        rows.append(("I/O floor (import torch, load inputs, write output size)", floor, None))
        if args.sd_scripts and args.stock_python:
            stock = timed([args.stock_python, "networks/svd_merge_lora.py", "--models", *models, *MERGE_ARGS,
                           "--save_to", str(Path(tmp) / "stock.safetensors")], cwd=args.sd_scripts)
            rows.append(("stock sd-scripts svd_merge_lora.py (1 run)", stock, None))

    floor_seconds = floor.seconds
    lines = [
        f"Shared real SD1.5 pair (264 modules, B − A, `--new_rank 16 --save_precision fp16 --device cpu`), "
        f"best of {args.repeat} fresh processes. Machine: {machine()}. Measured {datetime.date.today()}.",
        "",
        "| command | wall s | × floor | merge core s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, run, core in rows:
        core_text = f"{core:.3f}" if core is not None else "–"
        lines.append(f"| {label} | {run.seconds:.2f} | {run.seconds / floor_seconds:.2f} | {core_text} | {run.peak_rss_mb:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = README.read_text() if README.exists() else "# Benchmarks\n"
        section = f"{START}\n{table}\n{END}"
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n## Whole merge process (`bench/bench_merge.py`)\n\n" + section + "\n"
        README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
