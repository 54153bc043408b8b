"""Patch an sd-scripts checkout so its networks/svd_merge_lora.py and networks/resize_lora.py run
copylora's merge and resize, reversibly.

Layout inside the checkout's networks/ folder once installed, for each SCRIPT of SCRIPTS:

    SCRIPT.py                    copylora's shim (sd_scripts_patch/shim.py, verbatim; it reads
                                 which copylora command to run from its own file name)
    SCRIPT.copylora-original.py  the original, byte for byte, same mode bits
    SCRIPT.copylora.json         sidecar: sha256 of the original and of the shim written

Each script is patched on its own. State is decided by content: the shim's marker line and the two hashes in the sidecar, so
"modified by someone else" is exact. Every write is a temp file in the same folder + os.replace.
Install writes kept original, sidecar, shim (in that order); uninstall restores the original,
then removes the kept copy and the sidecar; a crash between steps leaves the target either the
original or the intact shim, and the next install/uninstall finishes the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path

from copylora.errors import CopyloraError


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


MERGE_SCRIPT = Script("svd_merge_lora", "copylora.merge")
RESIZE_SCRIPT = Script("resize_lora", "copylora.resize")
SCRIPTS = (MERGE_SCRIPT, RESIZE_SCRIPT)  # the shim's COMMANDS must say the same (tested)
SHIM_SOURCE = "shim.py"
SHIM_MARKER = re.compile(rb"\A# copylora shim v(\d+)\s*$", re.MULTILINE)
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

    @property
    def networks(self) -> Path:
        return self.root / "networks"

    def rel(self, name: str) -> str:
        return f"networks/{name}"

    def describe(self) -> str:
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
                how = "was replaced (by an update or git checkout?)" if self.replaced else "is the original"
                extra = (
                    f"; it {how} and copylora's leftover {names} can go: `install` patches the script "
                    "now there, `uninstall` removes them"
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


def inspect(root: Path, script: Script = MERGE_SCRIPT) -> State:
    """Where one script of a checkout stands; decided from file contents only."""
    networks = root / "networks"
    target, kept = _read(networks / script.target), _read(networks / script.kept)
    sidecar, sidecar_problem = _load_sidecar(networks / script.sidecar)
    state = State(root, script, NOT_INSTALLED, [], [], target, kept, sidecar)
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

    if shim_version(target) is None:  # the target is some svd_merge_lora.py, not ours
        if kept is None and not have_sidecar_file:
            return state
        # the kept copy is ours as written when it matches the record, and harmless to drop when
        # it equals the script in place (which also covers an install interrupted after it)
        ours_intact = sidecar_problem is None and (
            kept is None
            or kept == target
            or (sidecar is not None and sha256(kept) == sidecar["original_sha256"])
        )
        if ours_intact:
            # copylora's own files beside a real script: an interrupted install/uninstall, or the
            # shim was replaced (git checkout, an sd-scripts/GUI update). Nothing of anyone else's
            # would be lost by `install` (which keeps the current script) or `uninstall`.
            state.leftovers = [p for p in (networks / script.kept, networks / script.sidecar) if p.exists()]
            state.replaced = sidecar is not None and sha256(target) != sidecar["original_sha256"]
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

    # the target is a shim
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


# ---------------------------------------------------------------- atomic file operations


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write data to path via a temp file in the same folder and os.replace; mode bits as given."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(mode))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    shim = shim_bytes()
    if state.kind == ABSENT:
        return f"skipped: {state.describe()}"
    if state.kind == INSTALLED:
        return f"already installed: {networks / script.target} runs {script.command} (nothing to do)"
    if state.kind == OUTDATED:
        original = state.kept
        assert original is not None
        mode = _mode(networks / script.kept)
        _write_sidecar(networks, script, original, shim, mode)
        atomic_write(networks / script.target, shim, mode)
        return f"updated the shim at {networks / script.target} (original kept as networks/{script.kept})"
    if state.kind == MODIFIED:
        if not force:
            raise _refuse(state, "install")
        if shim_version(state.target) is None and state.target is not None:
            original, mode = state.target, _mode(networks / script.target)  # the current script is the original
        elif state.kept is not None:
            original, mode = state.kept, _mode(networks / script.kept)  # keep the kept one, as it now is
        else:
            raise CopyloraError(
                f"{networks / script.target}: no original {script.target} to keep (the target is a shim and "
                f"networks/{script.kept} is missing); restore the original first, e.g. "
                f"`git -C {root} checkout -- networks/{script.target}`"
            )
    else:  # NOT_INSTALLED, perhaps with leftovers from an interrupted run
        assert state.target is not None
        original, mode = state.target, _mode(networks / script.target)
    if state.kept != original or _mode(networks / script.kept, -1) != mode:
        atomic_write(networks / script.kept, original, mode)
    _write_sidecar(networks, script, original, shim, mode)
    atomic_write(networks / script.target, shim, mode)
    return (
        f"installed: {networks / script.target} runs {script.command} when copylora imports; "
        f"original kept as networks/{script.kept}"
    )


def uninstall(root: Path, script: Script = MERGE_SCRIPT, force: bool = False) -> str:
    """Restore the original byte for byte and remove copylora's files; returns what was done."""
    state = inspect(root, script)
    networks = state.networks
    if state.kind == ABSENT:
        return f"skipped: {state.describe()}"
    if state.kind == NOT_INSTALLED:
        if not state.leftovers:
            return f"not installed: {networks / script.target} is not copylora's shim (nothing to do)"
        for path in state.leftovers:
            _unlink(path)
        return f"not installed; removed leftover {', '.join('networks/' + p.name for p in state.leftovers)}"
    if state.kind == MODIFIED:
        if not force:
            raise _refuse(state, "uninstall")
        if state.target is not None and shim_version(state.target) is None:
            # the target is someone's script (e.g. an updated upstream one): leave it, drop ours
            removed = [p for p in (networks / script.kept, networks / script.sidecar) if p.exists()]
            for path in removed:
                _unlink(path)
            names = ", ".join("networks/" + p.name for p in removed)
            return f"removed {names}; left {networks / script.target} as it is (it is not copylora's shim)"
        if state.kept is None:
            raise CopyloraError(
                f"{networks / script.kept}: the kept original is missing, nothing to restore; get the "
                f"original back with `git -C {root} checkout -- networks/{script.target}`"
            )
    assert state.kept is not None
    atomic_write(networks / script.target, state.kept, _mode(networks / script.kept))
    _unlink(networks / script.kept)
    _unlink(networks / script.sidecar)
    return f"uninstalled: restored the original {networks / script.target}"


# ---------------------------------------------------------------- every script at once


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
    if not force:
        _check_none_modified(root, "install")
    return [install(root, script, force) for script in SCRIPTS]


def uninstall_all(root: Path, force: bool = False) -> list[str]:
    """uninstall() for every script; nothing is written if one of them would be refused."""
    if not force:
        _check_none_modified(root, "uninstall")
    return [uninstall(root, script, force) for script in SCRIPTS]


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
