"""Patch an sd-scripts checkout so its networks/svd_merge_lora.py runs copylora's merge, reversibly.

Layout inside the checkout's networks/ folder once installed:

    svd_merge_lora.py                    copylora's shim (sd_scripts_patch/svd_merge_lora.py, verbatim)
    svd_merge_lora.copylora-original.py  the original, byte for byte, same mode bits
    svd_merge_lora.copylora.json         sidecar: sha256 of the original and of the shim written

State is decided by content: the shim's marker line and the two hashes in the sidecar, so
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
import tempfile
from pathlib import Path

from copylora.errors import CopyloraError

TARGET = "svd_merge_lora.py"
KEPT = "svd_merge_lora.copylora-original.py"
SIDECAR = "svd_merge_lora.copylora.json"
SHIM_MARKER = re.compile(rb"\A# copylora shim v(\d+)\s*$", re.MULTILINE)
SIDECAR_FORMAT = 1
GUI_SUBDIR = "sd-scripts"

NOT_INSTALLED = "not installed"
INSTALLED = "installed"
OUTDATED = "installed (older shim)"
MODIFIED = "modified by someone else"


# ---------------------------------------------------------------- the shim's source


def shim_path() -> Path:
    """sd_scripts_patch/svd_merge_lora.py: from the source tree, else from the installed package data."""
    candidates = [Path(__file__).resolve().parents[2] / "sd_scripts_patch"]
    for name in ("copylora.sd_scripts_patch", "sd_scripts_patch"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / TARGET).is_file():
            return folder / TARGET
    raise CopyloraError(
        f"{candidates[0] / TARGET}: copylora's shim is missing from this installation "
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
    has_script = (networks / TARGET).is_file() or (networks / KEPT).is_file()
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
        f"{given}: not an sd-scripts checkout (no networks/{TARGET}, networks/lora.py and library/) "
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
    kind: str  # NOT_INSTALLED, INSTALLED, OUTDATED or MODIFIED
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
        where = self.networks / TARGET
        if self.kind == INSTALLED:
            return f"installed: {where} runs copylora's merge (original kept as {self.rel(KEPT)})"
        if self.kind == OUTDATED:
            return f"installed, older shim: {where} runs copylora's merge; `install` updates the shim"
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
        return None, f"networks/{SIDECAR} is not copylora's sidecar any more (unreadable)"
    return data, None


def inspect(root: Path) -> State:
    """Where a checkout stands; decided from file contents only."""
    networks = root / "networks"
    target, kept = _read(networks / TARGET), _read(networks / KEPT)
    sidecar, sidecar_problem = _load_sidecar(networks / SIDECAR)
    state = State(root, NOT_INSTALLED, [], [], target, kept, sidecar)
    have_sidecar_file = (networks / SIDECAR).exists()

    if target is None:
        state.kind = MODIFIED
        state.reasons.append(f"networks/{TARGET} is missing")
        if kept is None:
            state.reasons.append(f"and so is the kept original networks/{KEPT}")
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
            state.leftovers = [p for p in (networks / KEPT, networks / SIDECAR) if p.exists()]
            state.replaced = sidecar is not None and sha256(target) != sidecar["original_sha256"]
            return state
        state.kind = MODIFIED
        if sidecar_problem:
            state.reasons.append(sidecar_problem)
        else:
            state.reasons.append(
                f"networks/{TARGET} is not copylora's shim, and the kept original networks/{KEPT} "
                "differs from both it and the recorded hash"
            )
        return state

    # the target is a shim
    if kept is None:
        state.reasons.append(f"the kept original networks/{KEPT} is missing")
    if sidecar_problem:
        state.reasons.append(sidecar_problem)
    elif sidecar is None:
        state.reasons.append(f"networks/{SIDECAR} (hashes of the original and the shim) is missing")
    else:
        if kept is not None and sha256(kept) != sidecar["original_sha256"]:
            state.reasons.append(f"the kept original networks/{KEPT} was changed")
        if sha256(target) != sidecar["shim_sha256"]:
            state.reasons.append(f"the shim networks/{TARGET} was changed")
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


def _write_sidecar(networks: Path, original: bytes, shim: bytes, mode: int) -> None:
    record = {
        "format": SIDECAR_FORMAT,
        "note": f"written by copylora.patch; {KEPT} is the original {TARGET}",
        "original_sha256": sha256(original),
        "original_mode": oct(mode),
        "shim_sha256": sha256(shim),
        "shim_version": shim_version(shim),
        "copylora_source": copylora_source(),
    }
    atomic_write(networks / SIDECAR, (json.dumps(record, indent=1) + "\n").encode("utf-8"), 0o644)


# ---------------------------------------------------------------- install / uninstall


def _refuse(state: State, action: str) -> CopyloraError:
    return CopyloraError(
        f"{state.networks / TARGET}: {state.describe()}; refusing to {action} (rerun with --force "
        f"to {action} anyway)"
    )


def install(root: Path, force: bool = False) -> str:
    """Put the shim in place and keep the original; returns what was done, one line."""
    state = inspect(root)
    networks = state.networks
    shim = shim_bytes()
    if state.kind == INSTALLED:
        return f"already installed: {networks / TARGET} runs copylora's merge (nothing to do)"
    if state.kind == OUTDATED:
        original = state.kept
        assert original is not None
        mode = _mode(networks / KEPT)
        _write_sidecar(networks, original, shim, mode)
        atomic_write(networks / TARGET, shim, mode)
        return f"updated the shim at {networks / TARGET} (original kept as networks/{KEPT})"
    if state.kind == MODIFIED:
        if not force:
            raise _refuse(state, "install")
        if shim_version(state.target) is None and state.target is not None:
            original, mode = state.target, _mode(networks / TARGET)  # the current script is the original
        elif state.kept is not None:
            original, mode = state.kept, _mode(networks / KEPT)  # keep the kept one, as it now is
        else:
            raise CopyloraError(
                f"{networks / TARGET}: no original svd_merge_lora.py to keep (the target is a shim and "
                f"networks/{KEPT} is missing); restore the original first, e.g. "
                f"`git -C {root} checkout -- networks/{TARGET}`"
            )
    else:  # NOT_INSTALLED, perhaps with leftovers from an interrupted run
        assert state.target is not None
        original, mode = state.target, _mode(networks / TARGET)
    if state.kept != original or _mode(networks / KEPT, -1) != mode:
        atomic_write(networks / KEPT, original, mode)
    _write_sidecar(networks, original, shim, mode)
    atomic_write(networks / TARGET, shim, mode)
    return (
        f"installed: {networks / TARGET} now runs copylora's merge; original kept as "
        f"networks/{KEPT} (undo: python -m copylora.patch uninstall --sd-scripts {root})"
    )


def uninstall(root: Path, force: bool = False) -> str:
    """Restore the original byte for byte and remove copylora's files; returns what was done."""
    state = inspect(root)
    networks = state.networks
    if state.kind == NOT_INSTALLED:
        if not state.leftovers:
            return f"not installed: {networks / TARGET} is not copylora's shim (nothing to do)"
        for path in state.leftovers:
            _unlink(path)
        return f"not installed; removed leftover {', '.join('networks/' + p.name for p in state.leftovers)}"
    if state.kind == MODIFIED:
        if not force:
            raise _refuse(state, "uninstall")
        if state.target is not None and shim_version(state.target) is None:
            # the target is someone's script (e.g. an updated upstream one): leave it, drop ours
            removed = [p for p in (networks / KEPT, networks / SIDECAR) if p.exists()]
            for path in removed:
                _unlink(path)
            names = ", ".join("networks/" + p.name for p in removed)
            return f"removed {names}; left {networks / TARGET} as it is (it is not copylora's shim)"
        if state.kept is None:
            raise CopyloraError(
                f"{networks / KEPT}: the kept original is missing, nothing to restore; get the "
                f"original back with `git -C {root} checkout -- networks/{TARGET}`"
            )
    assert state.kept is not None
    atomic_write(networks / TARGET, state.kept, _mode(networks / KEPT))
    _unlink(networks / KEPT)
    _unlink(networks / SIDECAR)
    return f"uninstalled: restored the original {networks / TARGET}"
