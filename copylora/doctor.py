"""`python -m copylora.doctor`: which merge backend runs here, and why."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path
from typing import Sequence

import torch

from copylora import __version__
from copylora.engine import ops
from copylora.errors import run_cli, shown
from copylora.runtime.cli_help import DefaultsHelpFormatter
from copylora.runtime.extension_build import KERNEL_LABELS, BuildRecord

PROG = "copylora.doctor"

def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=shown(PROG),
        description=(
            "Report the torch build, whether copylora's C++/CUDA extension (copylora._C) is built and "
            "loads, with which kernels, and which backend `--backend auto` picks on the CPU and on CUDA."
        ),
        formatter_class=DefaultsHelpFormatter,
    )


def auto_choice(status: ops.ExtensionStatus, device: str) -> str:
    """What `--backend auto` runs on this device type, with the reason when it is not the extension."""
    if not status.available:
        return f"torch (copylora._C: {status.error})"
    if device == "cuda" and not status.cuda:
        return "torch (copylora._C was built without CUDA kernels)"
    return f"ext (C++ {'CUDA' if device == 'cuda' else 'CPU'})"


def installed_elsewhere(here: Path = ops.PACKAGE_FOLDER) -> Path | None:
    """The installed copylora's folder when this process imported another copylora instead — the
    source folder, found first because `python -m` looks in the current folder first."""
    try:
        installed = Path(importlib.metadata.distribution("copylora").locate_file("copylora/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        return None
    # an editable install has no copylora/ of its own in site-packages: it imports the source folder
    if installed.is_file() and installed.parent.resolve() != here.resolve():
        return installed.parent
    return None


def extension_lines(status: ops.ExtensionStatus, record: BuildRecord | None, elsewhere: Path | None) -> list[str]:
    """What doctor says about copylora._C: built or not, why, and the command that builds the rest."""
    if status.available:
        kernels = [name for name, present in (("CPU", status.cpu), ("CUDA", status.cuda)) if present]
        lines = [f"copylora._C: built, {' and '.join(kernels) or 'no'} kernels ({status.path})"]
        if record is not None and record.missing == "cuda" and not status.cuda:
            lines += [f"  no CUDA kernels: {record.why}", f"  to build them: {record.rebuild_line()}"]
        if elsewhere is not None:
            lines.append(
                f"  imported from the source folder {ops.PACKAGE_FOLDER} (Python looks in the current folder "
                f"first), not from this Python's installed copylora ({elsewhere}): that _C is the source folder's"
                + _built_by(record)
            )
        return lines
    if elsewhere is not None:
        return [
            f"copylora._C: not in {ops.PACKAGE_FOLDER}: that is copylora's source folder, imported instead of "
            f"the installed copylora ({elsewhere}) because Python looks in the current folder first",
            "  nothing to rebuild: the console script `copylora doctor`, or `python -m copylora doctor` run from "
            "another folder, checks the installed copylora",
        ]
    if record is not None and record.built == "none":
        return [
            f"copylora._C: not built: {record.why}",
            f"  merges run on the pure-torch backend; to build it: {record.rebuild_line()}",
        ]
    lines = [f"copylora._C: not loaded: {status.error}"]
    if record is None:
        lines.append("  build it with: python -m pip install --no-build-isolation -e .  (in the copylora source folder)")
        return lines
    if record.torch_version != torch.__version__:
        lines.append(f"  it was built against torch {record.torch_version}; this is torch {torch.__version__}")
    lines.append(f"  rebuild it ({KERNEL_LABELS[record.built]}) with: {record.installer.command(record.built)}")
    return lines


def _built_by(record: BuildRecord | None) -> str:
    """Whose build an in-place _C is, when its record names another Python than this one."""
    if record is None:
        return ", with no build record beside it"
    if Path(record.installer.python).resolve() != Path(sys.executable).resolve():
        return f", built by {record.installer.python}, not this Python ({sys.executable})"
    return ", built by this Python"


def report() -> list[str]:
    status = ops.load_status()
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines = [
        f"copylora {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; {cuda_devices} CUDA device(s) visible)",
    ]
    record = BuildRecord.load(ops.PACKAGE_FOLDER)
    lines += extension_lines(status, record, installed_elsewhere())
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
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
