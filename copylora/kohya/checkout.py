"""Patch an sd-scripts checkout so its networks/svd_merge_lora.py and networks/resize_lora.py run
copylora's merge and resize, reversibly.

Layout inside the checkout's networks/ folder once installed, for each SCRIPT of SCRIPTS:

    SCRIPT.py                    copylora's shim (sd_scripts_patch/shim.py, verbatim; it reads
                                 which copylora command to run from its own file name)
    SCRIPT.copylora-original.py  the original, byte for byte, same mode bits
    SCRIPT.copylora.json         sidecar: sha256 of the original and of the shim written, the mode

The original script is the user's, and no sequence of commands, edits of the shim or races may
lose its bytes. That holds by construction, through the only two ways bytes can go away:

- SCRIPT.py is overwritten only while it is a copylora shim (recognised by its content, edited or
  not: see `is_shim`) or equal, byte for byte, to the kept original (`_replace_target`);
- the kept original is removed only while SCRIPT.py holds the same bytes; otherwise it is renamed
  to SCRIPT.copylora-original.<sha256 prefix>.py, never over another file (`_retire_kept`). It is
  never overwritten.

Every write is a temp file in the same folder + rename (formats.atomic_file), and one patch
command at a time holds a lock on networks/ (`_checkout_lock`; POSIX flock, released if the
process dies), so install and uninstall racing each other run one after the other. State is
decided from file contents only: the shim's content and the two hashes in the sidecar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from copylora.errors import CopyloraError
from copylora.formats.atomic_file import atomic_write as _atomic_write
from copylora.formats.atomic_file import describe_os_error

try:  # POSIX; on Windows patch commands are not serialised (the ordering above still holds)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Script:
    """One kohya script the patch replaces, and the copylora command that runs in its place."""

    stem: str
    command: str  # the copylora module run as `python -m`

    @property
    def target(self) -> str:
        return f"{self.stem}.py"

    @property
    def kept(self) -> str:
        return f"{self.stem}.copylora-original.py"

    @property
    def sidecar(self) -> str:
        return f"{self.stem}.copylora.json"

    def archive(self, data: bytes) -> str:
        """Where a kept original that cannot simply be dropped is moved: named by its content."""
        return f"{self.stem}.copylora-original.{sha256(data)[:12]}.py"

    @property
    def archive_pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.stem) + r"\.copylora-original\.[0-9a-f]{12}(-\d+)?\.py")


MERGE_SCRIPT = Script("svd_merge_lora", "copylora.merge")
RESIZE_SCRIPT = Script("resize_lora", "copylora.resize")
SCRIPTS = (MERGE_SCRIPT, RESIZE_SCRIPT)  # the shim's COMMANDS must say the same (tested)
SHIM_SOURCE = "shim.py"
SHIM_MARKER = re.compile(rb"\A# copylora shim v(\d+)\s*$", re.MULTILINE)
# a shim however edited: its marker on any line (after a BOM, a shebang, an encoding line...), or
# the names only the shim uses; kohya's scripts contain none of them
EDITED_SHIM_MARKER = re.compile(rb"^(?:\xef\xbb\xbf)?[ \t]*#[ \t]*copylora shim v\d+", re.MULTILINE)
SHIM_WORDS = (b"COPYLORA_USE_ORIGINAL", b"copylora-original")
SIDECAR_FORMAT = 1
GUI_SUBDIR = "sd-scripts"

ABSENT = "not in this checkout"
NOT_INSTALLED = "not installed"
INSTALLED = "installed"
OUTDATED = "installed (older shim)"
MODIFIED = "modified by someone else"

# `patch status` exit codes (README, --help): the worst state of any script wins
STATUS_EXIT_CODES = {INSTALLED: 0, OUTDATED: 0, ABSENT: 0, NOT_INSTALLED: 1, MODIFIED: 3}


# ---------------------------------------------------------------- the shim's source


def shim_path() -> Path:
    """sd_scripts_patch/shim.py: from the source tree, else from the installed package data."""
    candidates = [Path(__file__).resolve().parents[2] / "sd_scripts_patch"]
    for name in ("copylora.sd_scripts_patch", "sd_scripts_patch"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / SHIM_SOURCE).is_file():
            return folder / SHIM_SOURCE
    raise CopyloraError(
        f"{candidates[0] / SHIM_SOURCE}: copylora's shim is missing from this installation "
        "(reinstall copylora; it ships sd_scripts_patch/ as package data)"
    )


def shim_bytes() -> bytes:
    data = shim_path().read_bytes()
    if shim_version(data) is None:
        raise CopyloraError(f"{shim_path()}: not a copylora shim (no '# copylora shim vN' first line)")
    return data


def shim_version(data: bytes | None) -> int | None:
    """N from a first line `# copylora shim vN`, or None when data is not a shim."""
    if data is None:
        return None
    m = SHIM_MARKER.match(data)
    return int(m.group(1)) if m else None


def copylora_source() -> str | None:
    """The folder to `pip install` copylora from, when this copylora runs from a source tree."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "sd_scripts_patch").is_dir():
        return str(root)
    return None


# ---------------------------------------------------------------- locating the checkout


def _is_checkout(root: Path) -> bool:
    networks = root / "networks"
    has_script = (networks / MERGE_SCRIPT.target).is_file() or (networks / MERGE_SCRIPT.kept).is_file()
    return has_script and (networks / "lora.py").is_file() and (root / "library").is_dir()


def find_checkout(path: str | os.PathLike) -> Path:
    """The sd-scripts root for DIR: DIR itself, or DIR/sd-scripts for a Kohya's GUI root."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise CopyloraError(f"{given}: no such folder (pass an sd-scripts checkout or a Kohya's GUI folder)")
    root = given.resolve()
    for candidate in (root, root / GUI_SUBDIR):
        if _is_checkout(candidate):
            return candidate
    raise CopyloraError(
        f"{given}: not an sd-scripts checkout (no networks/{MERGE_SCRIPT.target}, networks/lora.py and library/) "
        f"and not a Kohya's GUI folder with one in {GUI_SUBDIR}/"
    )


# ---------------------------------------------------------------- state


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def is_shim(data: bytes | None, sidecar: dict | None = None) -> bool:
    """Whether data is copylora's shim, as written or edited in any way that leaves a trace of it
    (a BOM, a shebang or an encoding line added, the marker line deleted, other lines changed)."""
    if data is None:
        return False
    if shim_version(data) is not None or (sidecar is not None and sha256(data) == sidecar["shim_sha256"]):
        return True
    return EDITED_SHIM_MARKER.search(data) is not None or all(word in data for word in SHIM_WORDS)


@dataclasses.dataclass
class State:
    root: Path
    script: Script
    kind: str  # ABSENT, NOT_INSTALLED, INSTALLED, OUTDATED or MODIFIED
    reasons: list[str]  # why MODIFIED
    leftovers: list[Path]  # copylora's files left beside a real script (NOT_INSTALLED only)
    target: bytes | None
    kept: bytes | None
    sidecar: dict | None
    replaced: bool = False  # NOT_INSTALLED: the shim was replaced by a different script than the kept one
    archives: list[Path] = dataclasses.field(default_factory=list)  # earlier originals moved aside

    @property
    def networks(self) -> Path:
        return self.root / "networks"

    def rel(self, name: str) -> str:
        return f"networks/{name}"

    @property
    def original_mode(self) -> int | None:
        """The original's mode bits as recorded at install, when the kept copy is the recorded one."""
        if self.sidecar is None or self.kept is None or sha256(self.kept) != self.sidecar["original_sha256"]:
            return None
        try:
            return stat.S_IMODE(int(str(self.sidecar.get("original_mode")), 8))
        except ValueError:
            return None

    def describe(self) -> str:
        return self._describe() + self._archives_note()

    def _archives_note(self) -> str:
        if not self.archives:
            return ""
        names = ", ".join(self.rel(p.name) for p in self.archives)
        return f" ({names}: an earlier original of this script, kept by copylora; delete it when you no longer need it)"

    def _describe(self) -> str:
        where, command = self.networks / self.script.target, self.script.command
        if self.kind == ABSENT:
            return f"not in this checkout: there is no {where}"
        if self.kind == INSTALLED:
            return f"installed: {where} runs {command} (original kept as {self.rel(self.script.kept)})"
        if self.kind == OUTDATED:
            return f"installed, older shim: {where} runs {command}; `install` updates the shim"
        if self.kind == NOT_INSTALLED:
            extra = ""
            if self.leftovers:
                names = ", ".join(self.rel(p.name) for p in self.leftovers)
                if self.replaced:
                    extra = (
                        f"; it was replaced (by an update or git checkout?) and copylora's leftover {names} can "
                        "go: `install` patches the script now there, `uninstall` removes them; either way the "
                        f"kept original is moved to {self.rel(self.script.archive(self.kept or b''))}, not deleted"
                    )
                else:
                    extra = (
                        f"; it is the original and copylora's leftover {names} can go: `install` patches "
                        "it, `uninstall` removes them"
                    )
            return f"not installed: {where} is not copylora's shim{extra}"
        return f"modified by someone else: {'; '.join(self.reasons)}"


def _load_sidecar(path: Path) -> tuple[dict | None, str | None]:
    raw = _read(path)
    if raw is None:
        return None, None
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("original_sha256", "shim_sha256")
        ):
            raise ValueError("missing hashes")
    except (ValueError, UnicodeDecodeError):
        return None, f"networks/{path.name} is not copylora's sidecar any more (unreadable)"
    return data, None


def _archives(networks: Path, script: Script) -> list[Path]:
    try:
        return sorted(p for p in networks.iterdir() if script.archive_pattern.fullmatch(p.name))
    except OSError:
        return []


def inspect(root: Path, script: Script = MERGE_SCRIPT) -> State:
    """Where one script of a checkout stands; decided from file contents only."""
    networks = root / "networks"
    target, kept = _read(networks / script.target), _read(networks / script.kept)
    sidecar, sidecar_problem = _load_sidecar(networks / script.sidecar)
    state = State(root, script, NOT_INSTALLED, [], [], target, kept, sidecar, archives=_archives(networks, script))
    have_sidecar_file = (networks / script.sidecar).exists()

    if target is None and kept is None and not have_sidecar_file:
        state.kind = ABSENT  # e.g. an old checkout without this script: nothing to patch
        return state
    if target is None:
        state.kind = MODIFIED
        state.reasons.append(f"networks/{script.target} is missing")
        if kept is None:
            state.reasons.append(f"and so is the kept original networks/{script.kept}")
        return state

    if not is_shim(target, sidecar):  # the target is some svd_merge_lora.py, not ours
        if kept is None and not have_sidecar_file:
            return state
        # copylora's files beside a real script: an interrupted install/uninstall, or the shim was
        # replaced (git checkout, an sd-scripts/GUI update). Neither install nor uninstall loses
        # anything there: a kept original that differs from the script is moved aside, not dropped.
        if sidecar_problem is None and (
            kept is None or kept == target or (sidecar is not None and sha256(kept) == sidecar["original_sha256"])
        ):
            state.leftovers = [p for p in (networks / script.kept, networks / script.sidecar) if p.exists()]
            state.replaced = kept is not None and kept != target
            return state
        state.kind = MODIFIED
        if sidecar_problem:
            state.reasons.append(sidecar_problem)
        else:
            state.reasons.append(
                f"networks/{script.target} is not copylora's shim, and the kept original networks/{script.kept} "
                "differs from both it and the recorded hash"
            )
        return state

    # the target is a shim, perhaps edited
    if kept is None:
        state.reasons.append(f"the kept original networks/{script.kept} is missing")
    if sidecar_problem:
        state.reasons.append(sidecar_problem)
    elif sidecar is None:
        state.reasons.append(f"networks/{script.sidecar} (hashes of the original and the shim) is missing")
    else:
        if kept is not None and sha256(kept) != sidecar["original_sha256"]:
            state.reasons.append(f"the kept original networks/{script.kept} was changed")
        if sha256(target) != sidecar["shim_sha256"]:
            state.reasons.append(f"the shim networks/{script.target} was changed")
    if state.reasons:
        state.kind = MODIFIED
    elif target != shim_bytes():
        state.kind = OUTDATED
    else:
        state.kind = INSTALLED
    return state


# ---------------------------------------------------------------- the only ways bytes go away


def _mode(path: Path, default: int = 0o644) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return default


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write data to path via a temp file in the same folder and a rename; mode bits as given."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write, stat.S_IMODE(mode))


def _replace_target(networks: Path, script: Script, data: bytes, mode: int) -> None:
    """Put data at SCRIPT.py, only while what is there is a shim or a copy of the kept original."""
    current = _read(networks / script.target)
    if current is not None and not is_shim(current) and current != _read(networks / script.kept):
        raise CopyloraError(
            f"{networks / script.target}: changed while copylora was patching it (not copylora's shim and not "
            f"the kept original); left as it is"
        )
    atomic_write(networks / script.target, data, mode)


def _keep_original(networks: Path, script: Script, data: bytes, mode: int) -> Path | None:
    """Make SCRIPT.copylora-original.py hold data; a different kept original is moved aside first
    (where to is returned)."""
    kept = networks / script.kept
    current, archive = _read(kept), None
    if current is not None and current != data:
        archive = _retire_kept(networks, script)
        current = None
    if current is None:
        atomic_write(kept, data, mode)
    elif _mode(kept) != mode:
        os.chmod(kept, mode)
    return archive


def _retire_kept(networks: Path, script: Script) -> Path | None:
    """Take SCRIPT.copylora-original.py away: dropped when SCRIPT.py holds the same bytes, else
    renamed to SCRIPT.copylora-original.<sha>.py (returned), never over an existing file."""
    kept = networks / script.kept
    data = _read(kept)
    if data is None:
        return None
    if _read(networks / script.target) == data:
        kept.unlink()
        return None
    name = script.archive(data)
    for attempt in range(1, 100):
        archive = networks / (name if attempt == 1 else name.replace(".py", f"-{attempt}.py"))
        if _read(archive) == data:  # the same bytes are there already
            kept.unlink()
            return archive
        try:
            os.link(kept, archive)  # fails if the name is taken: never over another file
        except FileExistsError:
            continue
        kept.unlink()
        return archive
    raise CopyloraError(f"{kept}: cannot move it aside (too many {name} variants); left as it is")


def _write_sidecar(networks: Path, script: Script, original: bytes, shim: bytes, mode: int) -> None:
    record = {
        "format": SIDECAR_FORMAT,
        "note": f"written by copylora.patch; {script.kept} is the original {script.target}",
        "original_sha256": sha256(original),
        "original_mode": oct(mode),
        "shim_sha256": sha256(shim),
        "shim_version": shim_version(shim),
        "copylora_source": copylora_source(),
    }
    atomic_write(networks / script.sidecar, (json.dumps(record, indent=1) + "\n").encode("utf-8"), 0o644)


# ---------------------------------------------------------------- install / uninstall


def _refuse(state: State, action: str) -> CopyloraError:
    return CopyloraError(
        f"{state.networks / state.script.target}: {state.describe()}; refusing to {action} (rerun with --force "
        f"to {action} anyway)"
    )


def install(root: Path, script: Script = MERGE_SCRIPT, force: bool = False) -> str:
    """Put the shim in place and keep the original; returns what was done, one line."""
    state = inspect(root, script)
    networks = state.networks
    if state.kind == ABSENT:
        return f"skipped: {state.describe()}"
    if state.kind == INSTALLED:
        return f"already installed: {networks / script.target} runs {script.command} (nothing to do)"
    if state.kind == MODIFIED and not force:
        raise _refuse(state, "install")
    shim = shim_bytes()
    if state.target is not None and not is_shim(state.target, state.sidecar):
        # a real script is in place (never installed, interrupted, or replaced by an update): it is the original
        original, mode = state.target, _mode(networks / script.target)
    elif state.kept is not None:  # a shim is in place: the kept original stays, as it now is
        original = state.kept
        mode = state.original_mode if state.original_mode is not None else _mode(networks / script.kept)
    else:
        raise CopyloraError(
            f"{networks / script.target}: no original {script.target} to keep (the target is a shim and "
            f"networks/{script.kept} is missing); restore the original first, e.g. "
            f"`git -C {root} checkout -- networks/{script.target}`"
        )
    archive = _keep_original(networks, script, original, mode)
    _write_sidecar(networks, script, original, shim, mode)
    _replace_target(networks, script, shim, mode)
    if state.kind == OUTDATED:
        return f"updated the shim at {networks / script.target} (original kept as networks/{script.kept})"
    moved = f"; the earlier kept original is now networks/{archive.name}" if archive else ""
    return (
        f"installed: {networks / script.target} runs {script.command} when copylora imports; "
        f"original kept as networks/{script.kept}{moved}"
    )


def uninstall(root: Path, script: Script = MERGE_SCRIPT, force: bool = False) -> str:
    """Restore the original byte for byte and remove copylora's files; returns what was done."""
    state = inspect(root, script)
    networks = state.networks
    if state.kind == ABSENT:
        return f"skipped: {state.describe()}"
    if state.kind == NOT_INSTALLED and not state.leftovers:
        return f"not installed: {networks / script.target} is not copylora's shim (nothing to do)"
    if state.kind == MODIFIED and not force:
        raise _refuse(state, "uninstall")
    if state.target is not None and not is_shim(state.target, state.sidecar):
        # someone's script is in place (e.g. an updated upstream one): it stays, copylora's files go
        removed = ", ".join(state.rel(p.name) for p in (networks / script.kept, networks / script.sidecar) if p.exists())
        archive = _retire_kept(networks, script)
        _unlink(networks / script.sidecar)
        kept_note = f"; the original it replaced is kept as networks/{archive.name}" if archive else ""
        return f"not installed; removed leftover {removed}{kept_note}"
    if state.kept is None:
        raise CopyloraError(
            f"{networks / script.kept}: the kept original is missing, nothing to restore; get the "
            f"original back with `git -C {root} checkout -- networks/{script.target}`"
        )
    mode = state.original_mode if state.original_mode is not None else _mode(networks / script.kept)
    _replace_target(networks, script, state.kept, mode)
    _retire_kept(networks, script)  # the target now holds its bytes: dropped, not moved
    _unlink(networks / script.sidecar)
    return f"uninstalled: restored the original {networks / script.target}"


# ---------------------------------------------------------------- every script at once


T = TypeVar("T")


@contextlib.contextmanager
def _checkout_lock(root: Path) -> Iterator[None]:
    """One patch command at a time in a checkout: an exclusive flock on networks/ itself (no lock
    file to leave behind; the kernel releases it when the process ends in any way)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(root / "networks", os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: not serialised, as on Windows
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _locked(root: Path, action: str, work: Callable[[], T]) -> T:
    """work() under the checkout's lock; an OSError (read-only folder, an immutable file) becomes one
    line. Nothing is lost on the way: every step leaves the original's bytes in networks/."""
    try:
        with _checkout_lock(root):
            return work()
    except OSError as exc:
        where = exc.filename if exc.filename else root / "networks"
        raise CopyloraError(
            f"{where}: {describe_os_error(exc)}; {action} stopped there (the original script is in networks/ "
            f"as before; `status` says where each script stands)"
        ) from exc


def statuses(root: Path) -> list[State]:
    """inspect() for every script, under the lock so a running install/uninstall is not seen halfway."""
    return _locked(root, "status", lambda: [inspect(root, script) for script in SCRIPTS])


def status_exit_code(states: list[State]) -> int:
    """0: every script there is patched; 1: some script is not; 3: something was modified by someone else."""
    return max(STATUS_EXIT_CODES[state.kind] for state in states)


def _check_none_modified(root: Path, action: str) -> None:
    """Refuse before anything is written when any script would be refused."""
    for script in SCRIPTS:
        state = inspect(root, script)
        if state.kind == MODIFIED:
            raise _refuse(state, action)


def install_all(root: Path, force: bool = False) -> list[str]:
    """install() for every script; nothing is written if one of them would be refused."""

    def work() -> list[str]:
        if not force:
            _check_none_modified(root, "install")
        return [install(root, script, force) for script in SCRIPTS]

    return _locked(root, "install", work)


def uninstall_all(root: Path, force: bool = False) -> list[str]:
    """uninstall() for every script; nothing is written if one of them would be refused."""

    def work() -> list[str]:
        if not force:
            _check_none_modified(root, "uninstall")
        return [uninstall(root, script, force) for script in SCRIPTS]

    return _locked(root, "uninstall", work)


# ---------------------------------------------------------------- can kohya's Python run copylora?


def import_problem(python: str, cwd: Path) -> str | None:
    """None when `python` imports every command the shims run; else why not (its last error line)."""
    code = "import " + ", ".join(script.command for script in SCRIPTS)
    try:
        proc = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run it ({exc})"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def pip_install_command(python: str) -> str:
    """The command that makes copylora importable by `python` (the shim's hint says the same)."""
    source = copylora_source()
    where = f'"{source}"' if source else "<copylora source folder or wheel>"
    return f'"{python}" -m pip install --no-build-isolation {where}'
