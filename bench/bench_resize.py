"""Whole-process benchmark of `copylora.resize` (not a test): the real SD1.5 LoRA and a full SDXL one.

Each command runs in a fresh process (wall time and peak RSS from wait4), best of --repeat:
- copylora.resize with each backend (the engine's own time is read from its last line);
- the I/O floor: import torch, load the input, write a file of the output's size;
- stock sd-scripts' resize_lora.py when --sd-scripts and --stock-python are given (one run per
  case in --stock-cases; minutes per case), else stock's figures as recorded on this machine
  (RECORDED_STOCK), marked as such.

Cases: `real` = LoRA A of the shared real SD1.5 pair (264 modules, dim 8) -> rank 4;
`sdxl` = a synthetic SDXL LoRA with all 986 modules of kohya's manifest (dim 32, fp16) -> rank 8;
`sdxl-dynamic` = the same -> sv_fro 0.9, at most rank 16. All --save_precision fp16, CPU.

    python bench/bench_resize.py [--cases real sdxl sdxl-dynamic] [--repeat 3] \
        [--sd-scripts DIR --stock-python PY [--stock-cases real ...]] [--write]

--write replaces the "resize" section of bench/README.md with the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (FLOOR, REAL_PAIR, Run, best, engine_seconds, manifest_pair, timed, whole_process_parser,
                    whole_process_table)

COMMON_ARGS = ["--save_precision", "fp16", "--device", "cpu"]
SDXL_DIM = 32


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    synthetic: bool  # the SDXL LoRA synthesised from kohya's manifest; else the real SD1.5 A
    args: tuple[str, ...]
    recorded_stock: str  # stock on this machine, once, under load from other work (see bench/README.md)


CASES = {
    "real": Case("real", "real SD1.5 LoRA (264 modules), dim 8 → 4", False, ("--new_rank", "4"), "388 s (issue 10)"),
    "sdxl": Case("sdxl", f"synthetic SDXL (986 modules), dim {SDXL_DIM} → 8", True, ("--new_rank", "8"), "not recorded"),
    "sdxl-dynamic": Case(
        "sdxl-dynamic", f"synthetic SDXL (986 modules), dim {SDXL_DIM} → sv_fro 0.9, max 16", True,
        ("--new_rank", "16", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"), "not recorded",
    ),
}


def case_input(case: Case, workdir: Path) -> str:
    if not case.synthetic:
        return str(REAL_PAIR / "A.safetensors")
    _, a = manifest_pair("sdxl", workdir / "sdxl", dim=SDXL_DIM)  # deterministic: the same file every run
    return str(a)


def resize_command(model: str, case: Case, out: str, backend: str) -> list[str]:
    return [sys.executable, "-m", "copylora.resize", "--model", model, *case.args, *COMMON_ARGS, "--save_to", out,
            "--backend", backend, "--quiet"]


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> list[str]:
    model = case_input(case, workdir)
    out = str(workdir / f"{case.key}-resized.safetensors")
    rows: list[tuple[str, Run, str]] = []
    for backend in ("ext", "torch"):
        run = best([timed(resize_command(model, case, out, backend)) for _ in range(args.repeat)])
        rows.append((f"copylora.resize --backend {backend}", run, f"{engine_seconds(run.stdout):.3f}"))
    size = Path(out).stat().st_size
    floor = best([timed([sys.executable, "-c", FLOOR, model, str(workdir / "floor.safetensors"), str(size)])
                  for _ in range(args.repeat)])
    rows.append(("I/O floor", floor, "–"))
    if args.sd_scripts and args.stock_python and case.key in args.stock_cases:
        stock = timed([args.stock_python, "networks/resize_lora.py", "--model", model, *case.args, *COMMON_ARGS,
                       "--save_to", str(workdir / "stock.safetensors")], cwd=args.sd_scripts)
        rows.append(("stock resize_lora.py (1 run)", stock, "–"))
    lines = [
        f"| {case.label} | {label} | {run.seconds:.2f} | {run.seconds / floor.seconds:.2f} | {core} | {run.peak_rss_mb:.0f} |"
        for label, run, core in rows
    ]
    if not any(label.startswith("stock") for label, _, _ in rows):
        lines.append(f"| {case.label} | stock resize_lora.py (recorded, not rerun) | {case.recorded_stock} | – | – | – |")
    return lines


def main() -> int:
    parser = whole_process_parser(__doc__.splitlines()[0], list(CASES),
                                  "cases to run stock on (default: real; the SDXL cases take far longer)")
    args = parser.parse_args()
    whole_process_table(args, f"`{' '.join(COMMON_ARGS)}`", lambda key, tmp: run_case(CASES[key], args, tmp),
                        "resize", "Whole resize process (`bench/bench_resize.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
