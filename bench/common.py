"""What the whole-process benchmarks share: timing fresh processes, synthetic pairs, README sections."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "bench" / "README.md"
SHARED = REPO.parent / "shared"
REAL_PAIR = SHARED / "golden" / "real_sd15"
# kohya's module lists: vendored with the tests when present, else the shared reference data
MANIFEST_DIRS = (REPO / "tests" / "data" / "kohya" / "manifests", SHARED / "kohya" / "manifests")

# The I/O floor: import torch, load the inputs, write a file of the output's size. No merge can beat it.
# It sets up its process as the commands do (copylora/runtime/command_process.py: heap, frozen startup objects).
FLOOR = """
import sys, torch
from safetensors.torch import load_file, save_file
from copylora.runtime.command_process import prepare
prepare()
inputs = [load_file(p) for p in sys.argv[1:-2]]
n = int(sys.argv[-1]) // 2
save_file({"x": torch.zeros(n, dtype=torch.float16)}, sys.argv[-2])
"""


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    stdout: str
    cpu_seconds: float = 0.0  # user + system, every thread: steadier than wall time on a busy machine


def timed(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run a fresh process; wall time and peak RSS (from wait4). Fails loudly if it fails."""
    start = datetime.datetime.now()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = (datetime.datetime.now() - start).total_seconds()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return Run(seconds, usage.ru_maxrss / 1024, stdout, usage.ru_utime + usage.ru_stime)


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def interleaved_best(commands: dict[str, list[str]], repeat: int) -> dict[str, Run]:
    """Best of `repeat` for each command, run in rounds (a, b, c, a, b, c, ...), so that a drift in the
    machine's speed (minutes long on this shared VM) reaches every command alike, not the ones run last."""
    runs: dict[str, list[Run]] = {label: [] for label in commands}
    for _ in range(repeat):
        for label, cmd in commands.items():
            runs[label].append(timed(cmd))
    return {label: best(label_runs) for label, label_runs in runs.items()}


IO_FLOOR = "I/O floor"  # the row label of the floor


def with_io_floor(commands: dict[str, list[str]], inputs: list[str], output: Path, workdir: Path,
                  repeat: int) -> dict[str, Run]:
    """interleaved_best of the commands and of their I/O floor (under IO_FLOOR). The first command runs
    once before: it writes `output`, whose size the floor writes, and warms the page cache."""
    timed(next(iter(commands.values())))
    floor = [sys.executable, "-c", FLOOR, *inputs, str(workdir / "floor.safetensors"), str(output.stat().st_size)]
    return interleaved_best({**commands, IO_FLOOR: floor}, repeat)


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


def manifest_modules(variant: str) -> list[dict]:
    """The modules of kohya's `variant` manifest (sd15, sdxl, sd15_conv, sdxl_conv, flux1, ...), in kohya's order."""
    path = next((d / f"{variant}.json" for d in MANIFEST_DIRS if (d / f"{variant}.json").is_file()), None)
    if path is None:
        raise SystemExit(f"no manifest {variant}.json in {' or '.join(map(str, MANIFEST_DIRS))}")
    return json.loads(path.read_text())["modules"]


# What a kohya training run of the family writes beside training_metadata's SD1.5 keys.
FAMILY_METADATA = {
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0"},
    "flux1": {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
              "modelspec.architecture": "flux-1-dev/lora", "modelspec.implementation": "https://github.com/black-forest-labs/flux"},
}


def manifest_pair(variant: str, folder: Path, dim: int = 8, prefix: str = "") -> tuple[Path, Path]:
    """B.safetensors and A.safetensors with every module of kohya's `variant` manifest whose name
    starts with `prefix` (random fp16), with the family's metadata."""
    from copylora.formats.lora_file import write_lora
    from copylora.formats.synthetic import ModuleShape, random_lora, training_metadata

    layout = [
        ModuleShape(m["name"], m["up"][0], m["down"][1], tuple(m["down"][2:]) if len(m["down"]) == 4 else None)
        for m in manifest_modules(variant) if m["name"].startswith(prefix)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, title in enumerate(("B", "A")):
        metadata = {**training_metadata(title, dim, 1.0), **FAMILY_METADATA.get(variant.removesuffix("_conv"), {})}
        path = folder / f"{title}.safetensors"
        write_lora(path, random_lora(layout, dim, 1.0, seed), metadata)
        paths.append(path)
    return paths[0], paths[1]


def manifest_loha(variant: str, folder: Path, dim: int, seed: int = 0) -> Path:
    """LoHa.safetensors in kohya's networks.loha layout (hada_w1_a (out, dim), hada_w1_b (dim, in_flat),
    the same for w2, alpha) with every module of kohya's `variant` manifest: random fp16 factors at
    a trained LoHa's scale (each Hadamard factor's product small, ΔW of a LoRA's order)."""
    import torch

    from copylora.formats.lora_file import write_lora
    from copylora.formats.synthetic import training_metadata

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in manifest_modules(variant):
        out, in_flat = module["up"][0], math.prod(module["down"][1:])
        for factor in ("w1", "w2"):
            tensors[f"{module['name']}.hada_{factor}_a"] = (torch.randn(out, dim, generator=gen) * 0.05).half()
            tensors[f"{module['name']}.hada_{factor}_b"] = (torch.randn(dim, in_flat, generator=gen) / in_flat**0.5).half()
        tensors[f"{module['name']}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    metadata = {**training_metadata("LoHa", dim, 1.0), **FAMILY_METADATA.get(variant, {}),
                "ss_network_module": "networks.loha"}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "LoHa.safetensors"
    write_lora(path, tensors, metadata)
    return path


def write_section(name: str, heading: str, table: str) -> None:
    """Replace (or append) the <!-- name:start --> ... <!-- name:end --> section of bench/README.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    section = f"{start}\n{table}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    README.write_text(text)


@dataclass(frozen=True)
class Comparison:
    """One case of a whole-process benchmark: copylora's command per backend beside the floor and stock."""

    label: str
    tool: str  # "copylora.merge" or "copylora.resize": the row labels
    command: Callable[[str], list[str]]  # backend -> copylora's command line, writing `output`
    inputs: list[str]  # the LoRA files copylora reads, which the floor loads too
    output: Path
    stock_script: str  # "svd_merge_lora.py" ...: the row label
    stock_command: list[str] | None  # run in the sd-scripts checkout; None: show `recorded_stock`
    stock_cwd: Path | None
    recorded_stock: str  # stock's figure from an earlier run on this machine, and where it is recorded


def comparison_rows(case: Comparison, repeat: int, workdir: Path) -> list[str]:
    """Time both backends and the I/O floor (best of `repeat`, interleaved) and stock once; one row each."""
    commands = {f"{case.tool} --backend {backend}": case.command(backend) for backend in ("ext", "torch")}
    measured = with_io_floor(commands, case.inputs, case.output, workdir, repeat)
    floor = measured[IO_FLOOR]
    rows: list[tuple[str, Run, str]] = [
        (label, run, "–" if label == IO_FLOOR else f"{engine_seconds(run.stdout):.3f}")
        for label, run in measured.items()
    ]
    if case.stock_command is not None:
        rows.append((f"stock {case.stock_script} (1 run)", timed(case.stock_command, cwd=case.stock_cwd), "–"))
    data_mb = (sum(Path(p).stat().st_size for p in case.inputs) + case.output.stat().st_size) / 2**20
    lines = [
        f"| {case.label} | {label} | {run.seconds:.2f} | {run.seconds / floor.seconds:.2f} | {run.cpu_seconds:.2f} "
        f"| {run.cpu_seconds / floor.cpu_seconds:.2f} | {core} | {run.peak_rss_mb:.0f} | {data_mb:.0f} |"
        for label, run, core in rows
    ]
    if case.stock_command is None:
        lines.append(f"| {case.label} | stock {case.stock_script} (recorded, not rerun) | {case.recorded_stock} "
                     "| – | – | – | – | – | – |")
    return lines


def run_whole_process(
    description: str,
    cases: list[str],
    stock_help: str,
    intro: str,
    comparison: Callable[[str, argparse.Namespace, Path], Comparison],
    section: str,
    heading: str,
) -> None:
    """A whole-process benchmark's command line: parse the options every such benchmark takes, run each
    case (comparison(key, args, workdir)) in one temp folder, print the table and, with --write, put it
    in bench/README.md."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", nargs="+", choices=cases, default=cases)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sd-scripts", type=Path, help="an sd-scripts checkout, to time the stock script too")
    parser.add_argument("--stock-python", type=str, help="the Python that can run sd-scripts")
    parser.add_argument("--stock-cases", nargs="+", choices=cases, default=["real"], help=stock_help)
    parser.add_argument("--write", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    lines = [
        f"{intro}, best of {args.repeat} fresh processes run in interleaved rounds (copylora, floor, copylora, …). "
        f"Machine: {machine()}. Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) before the first case. "
        "CPU s = user + system seconds of the process, all threads (the best run's; the ratio against the "
        "floor's, which runs on one thread, counts the engine's second thread in full). inputs + output = "
        "the files' bytes (the memory rule: peak RSS within them + 400 MB).",
        "",
        "| case | command | wall s | × floor | CPU s | CPU × floor | engine s | peak RSS MB | inputs + output MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases:
            lines += comparison_rows(comparison(key, args, Path(tmp)), args.repeat, Path(tmp))
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(section, heading, table)
