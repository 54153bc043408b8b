"""Real faults for the fault-injection tests (tests/test_faults_*.py): a full disk and a read-only
folder, made with a small tmpfs where the tests run as root (and may mount), else skipped or
approximated with permissions, as each helper says; and the checks every case must pass."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at folder; None when done, else why it could not be."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed here: {proc.stderr.strip()}"


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@contextlib.contextmanager
def full_disk(folder: Path, size: str = "256k") -> Iterator[Path]:
    """A folder on a file system of `size` (a tmpfs, root only; skipped otherwise, with the reason)."""
    problem = _mount_tmpfs(folder, size)
    if problem:
        pytest.skip(f"a full disk is a small tmpfs: {problem}")
    try:
        yield folder
    finally:
        _umount(folder)


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A folder to fill, and the call that makes it read-only: a tmpfs remounted read-only where
    we may mount (root ignores permission bits), else mode 0o555 on every folder in it."""
    problem = _mount_tmpfs(folder, "16m")
    if problem is None:
        try:
            yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        finally:
            _umount(folder)
        return
    if os.name != "posix" or os.geteuid() == 0:
        pytest.skip(f"a read-only folder: {problem}, and root ignores permission bits")
    folder.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []

    def make_read_only() -> None:
        folders.extend([folder, *(p for p in folder.rglob("*") if p.is_dir())])
        for path in folders:
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)

    try:
        yield folder, make_read_only
    finally:
        for path in folders:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o200)


def digests(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def temp_files(folder: Path) -> list[Path]:
    """Files named like copylora's temp files (.NAME.<random>.tmp), anywhere below folder."""
    return [p for p in folder.rglob(".*.tmp")]


def assert_one_line_outcome(code: int, stderr: str, allowed: tuple[int, ...] = (0, 2)) -> None:
    """Exit 0 or 2 (or as allowed), at most one line on stderr, no traceback."""
    assert code in allowed, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr
