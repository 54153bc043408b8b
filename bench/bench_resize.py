"""Whole-process benchmark of `copylora.resize` (not a test): the real SD1.5 LoRA and a full SDXL one.

Each command runs in a fresh process (wall time and peak RSS from wait4), best of --repeat,
run in interleaved rounds (ext, torch, floor, ext, …) so the machine's drift reaches all alike:
- copylora.resize with each backend (the engine's own time is read from its last line);
- the I/O floor: import torch, load the input, write a file of the output's size;
- stock sd-scripts' resize_lora.py when --sd-scripts and --stock-python are given (one run per
  case in --stock-cases; minutes per case), else stock's figures as recorded on this machine
  (RECORDED_STOCK), marked as such.

Cases: `real` = LoRA A of the shared real SD1.5 pair (264 modules, dim 8) -> rank 4;
`sdxl` = a synthetic SDXL LoRA with all 986 modules of kohya's manifest (dim 32, fp16) -> rank 8;
`sdxl-dynamic` = the same -> sv_fro 0.9, at most rank 16; `flux` = a synthetic FLUX.1 LoRA with the 304
U-Net modules of kohya's lora_flux manifest (dim 32, fp16) -> rank 16; `sdxl-loha` = a synthetic SDXL LoHa
(kohya's networks.loha layout, all 986 modules, dim 16: a factored rank R = 16² = 256 per module) -> rank 32.
All --save_precision fp16, CPU.

    python bench/bench_resize.py [--cases real sdxl sdxl-dynamic flux sdxl-loha] [--repeat 3] \
        [--sd-scripts DIR --stock-python PY [--stock-cases real ...]] [--write]

--write replaces the "resize" section of bench/README.md with the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common import Comparison, REAL_PAIR, manifest_loha, manifest_pair, run_whole_process

COMMON_ARGS = ["--save_precision", "fp16", "--device", "cpu"]
SDXL_DIM = 32


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    variant: str | None  # the manifest a LoRA is synthesised from (dim 32); None: the real SD1.5 A
    args: tuple[str, ...]
    recorded_stock: str  # stock's figure from an earlier run on this machine (shown when it is not rerun)
    prefix: str = ""  # only the manifest's modules whose names start with this
    loha_dim: int = 0  # > 0: a LoHa of this dim instead of a LoRA of dim 32


CASES = {
    "real": Case("real", "real SD1.5 LoRA (264 modules), dim 8 → 4", None, ("--new_rank", "4"),
                 "125 s (2026-11-26, quiet)"),
    "sdxl": Case("sdxl", f"synthetic SDXL (986 modules), dim {SDXL_DIM} → 8", "sdxl", ("--new_rank", "8"),
                 "17:53, 7.98 GB peak (2026-11-26, load ≈ 8)"),
    "sdxl-dynamic": Case(
        "sdxl-dynamic", f"synthetic SDXL (986 modules), dim {SDXL_DIM} → sv_fro 0.9, max 16", "sdxl",
        ("--new_rank", "16", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"),
        "18:47, 7.45 GB peak (2026-11-26, load ≈ 8)",
    ),
    "flux": Case("flux", f"synthetic FLUX.1 (304 modules), dim {SDXL_DIM} → 16", "flux1", ("--new_rank", "16"),
                 "not run here; 20–25 min on a 16 GB GPU (kohya_ss #2804, sd-scripts #1567)", "lora_unet"),
    "sdxl-loha": Case("sdxl-loha", "synthetic SDXL LoHa (986 modules), dim 16 (R = 256) → 32", "sdxl",
                      ("--new_rank", "32"), "not run: stock resize_lora.py reads only LoRA keys", loha_dim=16),
}


def case_input(case: Case, workdir: Path) -> str:
    if case.variant is None:
        return str(REAL_PAIR / "A.safetensors")
    # deterministic: the same file every run
    if case.loha_dim:
        return str(manifest_loha(case.variant, workdir / f"{case.variant}-loha", case.loha_dim))
    _, a = manifest_pair(case.variant, workdir / case.variant, dim=SDXL_DIM, prefix=case.prefix)
    return str(a)


def comparison(case: Case, args: argparse.Namespace, workdir: Path) -> Comparison:
    model = case_input(case, workdir)
    out = workdir / f"{case.key}-resized.safetensors"
    stock = None
    if args.sd_scripts and args.stock_python and case.key in args.stock_cases:
        stock = [args.stock_python, "networks/resize_lora.py", "--model", model, *case.args, *COMMON_ARGS,
                 "--save_to", str(workdir / "stock.safetensors")]
    return Comparison(
        case.label, "copylora.resize",
        lambda backend: [sys.executable, "-m", "copylora.resize", "--model", model, *case.args, *COMMON_ARGS,
                         "--save_to", str(out), "--backend", backend, "--quiet"],
        [model], out, "resize_lora.py", stock, args.sd_scripts, case.recorded_stock,
    )


def main() -> int:
    run_whole_process(__doc__.splitlines()[0], list(CASES),
                      "cases to run stock on (default: real; the SDXL cases take far longer)",
                      f"`{' '.join(COMMON_ARGS)}`", lambda key, args, workdir: comparison(CASES[key], args, workdir),
                      "resize", "Whole resize process (`bench/bench_resize.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
