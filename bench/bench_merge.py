"""Whole-process benchmark of `copylora.merge` (not a test): real SD1.5, synthetic SDXL and LoCon.

Each command runs in a fresh process (wall time and peak RSS from wait4), best of --repeat,
run in interleaved rounds (ext, torch, floor, ext, …) so the machine's drift reaches all alike:
- copylora.merge with each backend (the engine's own time is read from its last line);
- the I/O floor: import torch, load the inputs, write a file of the output's size;
- stock sd-scripts' svd_merge_lora.py when --sd-scripts and --stock-python are given (for the
  cases in --stock-cases; SDXL takes ~13 min and 13 GB), else stock's figures from earlier runs
  on this machine (RECORDED_STOCK), marked as such.

Cases: `real` = the shared real SD1.5 pair (264 modules); `sdxl` = a synthetic SDXL pair with all
986 modules of kohya's manifest (dim 8, fp16); `locon` = a synthetic SD1.5 LoCon pair (350
modules, 3x3 convs, conv rank 8); `flux` = a synthetic FLUX.1 pair with the 304 U-Net modules of
kohya's lora_flux manifest (dim 32, fp16); `high-rank` = a synthetic SD1.5 pair of dim 128 merged to
128 (R = 256). All B − A, --new_rank 16 (high-rank: 128), --save_precision fp16, CPU.

    python bench/bench_merge.py [--cases real sdxl locon flux high-rank] [--repeat 3] \
        [--sd-scripts DIR --stock-python PY [--stock-cases real sdxl locon]] [--write]

--write replaces the "merge" section of bench/README.md with the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common import Comparison, REAL_PAIR, manifest_pair, run_whole_process

MERGE_ARGS = ["--ratios", "1", "-1", "--device", "cpu", "--save_precision", "fp16"]
RANK_ARGS = ("--new_rank", "16", "--new_conv_rank", "8")
# stock's times on this machine from earlier runs (shown when it is not rerun)
RECORDED_STOCK = {"sdxl": "≈ 13 min, 13 GB RAM (../shared/README.md)", "locon": "≈ 8 min (../shared/README.md)",
                  "real": "148 s (2026-11-26, bench/README.md)",
                  "flux": "none: stock has no SVD merge for FLUX.1 (its svd_merge_lora.py is for SD)",
                  "high-rank": "not run"}


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    variant: str | None  # manifest to synthesise the pair from; None: the real pair
    dim: int = 8
    prefix: str = ""  # only the manifest's modules whose names start with this
    rank_args: tuple[str, ...] = RANK_ARGS


CASES = {
    "real": Case("real", "real SD1.5 pair (264 modules)", None),
    "sdxl": Case("sdxl", "synthetic SDXL (986 modules)", "sdxl"),
    "locon": Case("locon", "synthetic SD1.5 LoCon (350 modules, conv rank 8)", "sd15_conv"),
    "flux": Case("flux", "synthetic FLUX.1 (304 modules), dim 32 + 32 → 16", "flux1", 32, "lora_unet"),
    "high-rank": Case("high-rank", "synthetic SD1.5 (264 modules), dim 128 + 128 → 128", "sd15", 128,
                      rank_args=("--new_rank", "128")),
}


def case_inputs(case: Case, workdir: Path) -> list[str]:
    if case.variant is None:
        return [str(REAL_PAIR / "B.safetensors"), str(REAL_PAIR / "A.safetensors")]
    return [str(p) for p in manifest_pair(case.variant, workdir / case.key, case.dim, case.prefix)]


def comparison(case: Case, args: argparse.Namespace, workdir: Path) -> Comparison:
    models = case_inputs(case, workdir)
    out = workdir / f"{case.key}-diff.safetensors"
    stock = None
    if args.sd_scripts and args.stock_python and case.key in args.stock_cases:
        stock = [args.stock_python, "networks/svd_merge_lora.py", "--models", *models, *MERGE_ARGS, *case.rank_args,
                 "--save_to", str(workdir / "stock.safetensors")]
    return Comparison(
        case.label, "copylora.merge",
        lambda backend: [sys.executable, "-m", "copylora.merge", "--models", *models, *MERGE_ARGS, *case.rank_args,
                         "--save_to", str(out), "--backend", backend, "--quiet"],
        models, out, "svd_merge_lora.py", stock, args.sd_scripts, RECORDED_STOCK[case.key],
    )


def main() -> int:
    run_whole_process(__doc__.splitlines()[0], list(CASES),
                      "cases to run stock on (default: real; sdxl takes ~13 min and 13 GB)",
                      f"B − A, `{' '.join(MERGE_ARGS)}` and `{' '.join(RANK_ARGS)}` unless the case says otherwise", lambda key, args, workdir: comparison(CASES[key], args, workdir),
                      "merge", "Whole merge process (`bench/bench_merge.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
