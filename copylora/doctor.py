"""`python -m copylora.doctor`: which merge backend runs here, and why."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from copylora import __version__
from copylora.engine import CUDA_KERNEL_VERIFIED, UNVERIFIED_CUDA, ops
from copylora.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m copylora.doctor",
        description=(
            "Report the torch build, whether copylora's C++/CUDA extension (copylora._C) is built and "
            "loads, with which kernels, and which backend `--backend auto` picks on the CPU and on CUDA."
        ),
    )


def auto_choice(status: ops.ExtensionStatus, device: str) -> str:
    """What `--backend auto` runs on this device type, with the reason when it is not the extension."""
    if not status.available:
        return f"torch (copylora._C did not load: {status.error})"
    if device == "cuda" and not status.cuda:
        return "torch (copylora._C was built without CUDA kernels)"
    if device == "cuda" and not CUDA_KERNEL_VERIFIED:
        return f"torch ({UNVERIFIED_CUDA}; --backend ext runs it)"
    return f"ext (C++ {'CUDA' if device == 'cuda' else 'CPU'})"


def report() -> list[str]:
    status = ops.load_status()
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [
        f"copylora {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; {cuda_devices} CUDA device(s) visible)",
    ]
    if status.available:
        kernels = [name for name, present in (("CPU", status.cpu), ("CUDA", status.cuda)) if present]
        lines.append(f"copylora._C: built, {' and '.join(kernels) or 'no'} kernels ({status.path})")
    else:
        lines.append(f"copylora._C: not loaded: {status.error}")
        lines.append("  rebuild with: pip install --no-build-isolation -e .")
    lines.append(f"--backend auto on cpu: {auto_choice(status, 'cpu')}")
    if cuda_devices:
        lines.append(f"--backend auto on cuda: {auto_choice(status, 'cuda')}")
    else:
        lines.append("--backend auto on cuda: no CUDA device here")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(report()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("copylora.doctor", lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
