"""Writing a file so that nobody ever sees it half-written and nothing is left behind.

The data goes to a temp file beside the target, `.NAME.<random>.tmp`, which is renamed over the
target only once it is complete. The writer holds an exclusive lock on its temp file for as long
as it exists, and the kernel drops that lock when the process dies in any way (kill -9
included), so a temp file nobody holds locked is stale: the next write to the same target removes
it. SIGTERM and SIGHUP during the write raise SystemExit, so the temp file is removed as on
Ctrl-C. Every OSError of the write is one CopyloraError naming the target.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from copylora.errors import CopyloraError

try:  # POSIX; Windows has no flock, and there stale temp files are not recognised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
TEMP_NAME_LENGTH = 8  # what tempfile.mkstemp puts between prefix and suffix
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def describe_os_error(exc: OSError) -> str:
    """`No space left on device` and the like, without the path (the message names it already)."""
    return exc.strerror or str(exc) or type(exc).__name__


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a target whose folder cannot take a file (read-only, no permission,
    /proc...): create and delete a probe named like the temp file."""
    path = Path(path)
    folder = _folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise CopyloraError(f"{path}: cannot write in {folder} ({describe_os_error(exc)})") from None
    os.close(fd)
    os.unlink(probe)


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Temp files of earlier writes to `path` whose writer is gone (no lock held): removed."""
    if fcntl is None:
        return []
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"[a-z0-9_]{%d}" % TEMP_NAME_LENGTH + re.escape(TEMP_SUFFIX))
    removed = []
    try:
        candidates = [p for p in _folder(path).iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(candidate).st_ino == os.fstat(fd).st_ino:
                os.unlink(candidate)
                removed.append(candidate)
        except OSError:  # locked by a running writer, or already gone
            pass
        finally:
            os.close(fd)
    return removed


def _locked_temp(path: Path) -> tuple[int | None, str]:
    """A new temp file beside `path`, created and locked by this process (the descriptor holding
    the lock is returned; None on Windows, which cannot rename a file that is open)."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=_folder(path))
        if fcntl is None:  # pragma: no cover - Windows
            os.close(fd)
            return None, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: its cleaners cannot lock either, so none removes it
            return fd, tmp
        try:  # a cleaner may have taken it between the two calls: then it is gone, make another
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit (exit status 128 + N) instead of killing the process on
    the spot, so `finally` blocks run; only where they would kill it and in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in TERMINATING_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], mode: int | None = None) -> None:
    """Call write(temp_path) on a temp file beside `path`, then rename it into place.

    mode: the file's permission bits (default 0o644 less the umask). Readers never see a
    half-written file; a failure, an exception or SIGTERM/SIGHUP leaves any existing file as it
    was and no temp file behind. OSErrors (disk full, read-only, permission) become one
    CopyloraError naming `path`.
    """
    path = Path(path)
    folder = _folder(path)
    if not folder.is_dir():
        raise CopyloraError(f"{path}: folder {folder} does not exist")
    remove_stale_temp_files(path)
    tmp = None
    try:
        with signals_exit():
            fd, tmp = _locked_temp(path)
            try:
                write(tmp)
                os.chmod(tmp, (0o644 & ~_umask()) if mode is None else mode)
                os.replace(tmp, path)
                tmp = None
            finally:
                if fd is not None:
                    os.close(fd)  # after the rename: the lock is held until the file is in place
    except OSError as exc:
        raise CopyloraError(f"{path}: could not write it ({describe_os_error(exc)}); nothing was written") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
