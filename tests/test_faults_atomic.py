"""copylora.formats.atomic_file on its own: which temp files count as stale, the signal handlers
it installs only for the write, the write probe, and write errors as one CopyloraError."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from copylora.errors import CopyloraError
from copylora.formats import atomic_file

posix_only = pytest.mark.skipif(atomic_file.fcntl is None, reason="stale temp files are recognised by flock (POSIX)")


@posix_only
def test_only_temp_files_nobody_holds_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    live_fd, live = atomic_file._locked_temp(target)  # a writer still at work
    dead_fd, dead = atomic_file._locked_temp(target)
    os.close(dead_fd)  # a writer that died: the kernel dropped its lock
    other = tmp_path / ".other.safetensors.abcdefgh.tmp"  # another target's: not ours to judge
    other.write_bytes(b"")
    mine_but_odd = tmp_path / ".out.safetensors.notmkstemp.tmp"
    mine_but_odd.write_bytes(b"")
    try:
        assert atomic_file.remove_stale_temp_files(target) == [Path(dead)]
        assert Path(live).exists() and other.exists() and mine_but_odd.exists()
    finally:
        assert live_fd is not None
        os.close(live_fd)
    assert atomic_file.remove_stale_temp_files(target) == [Path(live)]


def test_two_writers_of_one_target_leave_one_complete_file(tmp_path: Path) -> None:
    """The second write starts while the first one's temp file exists: neither is removed under the other."""
    target = tmp_path / "out.bin"

    def first(tmp: str) -> None:
        Path(tmp).write_bytes(b"first" * 1000)
        atomic_file.atomic_write(target, lambda tmp2: Path(tmp2).write_bytes(b"second" * 1000))

    atomic_file.atomic_write(target, first)
    assert target.read_bytes() == b"first" * 1000  # renamed last
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_signal_handlers_are_set_only_for_the_write(tmp_path: Path) -> None:
    seen = {}

    def write(tmp: str) -> None:
        seen["during"] = signal.getsignal(signal.SIGTERM)
        Path(tmp).write_bytes(b"x")

    before = signal.getsignal(signal.SIGTERM)
    atomic_file.atomic_write(tmp_path / "f", write)
    assert seen["during"] is atomic_file._exit_on_signal if before == signal.SIG_DFL else seen["during"] == before
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_failed_write_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    (tmp_path / "f").write_bytes(b"before")
    with pytest.raises(CopyloraError, match=r"f: could not write it \(No space left on device\); nothing was written"):
        atomic_file.atomic_write(tmp_path / "f", write)
    assert (tmp_path / "f").read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_write_probe_leaves_nothing(tmp_path: Path) -> None:
    atomic_file.check_writable(tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CopyloraError, match="cannot write in"):
        atomic_file.check_writable(tmp_path / "missing" / "out.safetensors")
