"""Bake a LoRA into a checkpoint with kohya's own networks/merge_lora.py (sdxl_merge_lora.py for SDXL).

The copy machine's "merged-base" method trains LoRA B on base + A. kohya's script reads a single
.safetensors/.ckpt checkpoint (not a diffusers folder) and writes a full checkpoint, several GB:
so the free space is checked before anything runs, and a stamp beside the result lets a rerun
reuse it while the base, the LoRA and the precision are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from copylora.errors import CopyloraError
from copylora.kohya.job import file_sha256, run_kohya, signature

SCRIPTS = {False: "networks/merge_lora.py", True: "networks/sdxl_merge_lora.py"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
PRECISIONS = {"float": 4, "fp16": 2, "bf16": 2}  # merge_lora.py's --save_precision choices, bytes per value
SPACE_MARGIN = 1.05  # header, VAE rounding and the like


@dataclass
class BakeJob:
    sd_scripts: Path
    python: str
    sdxl: bool
    base: Path
    lora: Path
    output: Path
    precision: str

    @property
    def script(self) -> str:
        return SCRIPTS[self.sdxl]

    @property
    def stamp_path(self) -> Path:
        return self.output.with_name(self.output.name + ".copylora.json")

    @property
    def command(self) -> list[str]:
        return [self.python, self.script, "--sd_model", str(self.base), "--models", str(self.lora),
                "--ratios", "1", "--save_precision", self.precision, "--save_to", str(self.output)]

    def describe(self) -> str:
        return f"# command, run in {self.sd_scripts}:\n{shlex.join(self.command)}"

    def fingerprint(self) -> str:
        """Changes when the result would: the script, the base file (path, size, time), the LoRA's bytes, precision.

        Call once the LoRA exists. The base is too big to hash on every run; its path, size and
        modification time stand for it.
        """
        base = self.base.resolve()
        state = {"script": self.script, "base": [str(base), *(signature(base) or ())],
                 "lora_sha256": file_sha256(self.lora), "precision": self.precision}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def plan(sd_scripts: Path, python: str, sdxl: bool, base: Path, lora: Path, output: Path, precision: str) -> BakeJob:
    """Check the script and the base; writes nothing."""
    job = BakeJob(sd_scripts, python, sdxl, base.resolve(), lora, output.resolve(), precision)
    if not (sd_scripts / job.script).is_file():
        raise CopyloraError(f"{sd_scripts / job.script}: not in this checkout (too old an sd-scripts?)")
    if precision not in PRECISIONS:
        raise CopyloraError(f"--bake-precision {precision}: one of {', '.join(PRECISIONS)}")
    if base.is_dir():
        raise CopyloraError(
            f"{base}: a diffusers folder; kohya's {job.script} reads one .safetensors/.ckpt checkpoint "
            "(convert it with sd-scripts' tools/convert_diffusers20_original_sd.py, or use --method subtract)"
        )
    if not base.is_file() or base.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CopyloraError(f"{base}: no such checkpoint (kohya's {job.script} reads a .safetensors or .ckpt file)")
    return job


def estimated_size(job: BakeJob) -> int:
    """Bytes of the checkpoint kohya will write: every tensor of the base at the save precision.

    A .safetensors header lists the tensors, so the estimate is exact but for the header; a .ckpt
    is opaque without unpickling it, so its own size stands in (doubled for float32).
    """
    size = job.base.stat().st_size
    if job.base.suffix.lower() != ".safetensors":
        return int(size * PRECISIONS[job.precision] / 2 * SPACE_MARGIN)
    with open(job.base, "rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        except (struct.error, ValueError) as exc:
            raise CopyloraError(f"{job.base}: not a safetensors file (unreadable header)") from exc
    values = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            values += count
    return int(values * PRECISIONS[job.precision] * SPACE_MARGIN)


def check_free_space(job: BakeJob) -> None:
    """Refuse before any training when the checkpoint will not fit (an old one is replaced, so it counts as free)."""
    folder = job.output.parent
    probe = folder
    while not probe.exists():  # the work folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if job.output.is_file():
        free += job.output.stat().st_size
    needed = estimated_size(job)
    if free < needed:
        raise CopyloraError(
            f"{folder}: the merged checkpoint (base + A, {job.precision}) needs about {_size(needed)}, "
            f"only {_size(free)} free there; free some space or pass --work-dir on a bigger disk"
        )


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count} bytes"


def reusable(job: BakeJob, fingerprint: str) -> dict | None:
    """The stamp of an earlier bake with the same inputs whose checkpoint is still there as written."""
    try:
        stamp = json.loads(job.stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fingerprint:
        return None
    written = signature(job.output)
    return stamp if written is not None and stamp.get("signature") == list(written) else None


def bake(job: BakeJob, fingerprint: str) -> float:
    """Run kohya's merge script; returns the seconds it took. The stamp is written only when it succeeded."""
    job.output.parent.mkdir(parents=True, exist_ok=True)
    remove(job)  # frees its space now, and a half-written file is never taken for a finished one
    seconds = run_kohya(job.command, job.sd_scripts, job.script)
    written = signature(job.output)
    if written is None:
        raise CopyloraError(f"{job.output}: kohya's {job.script} exited 0 but did not write this file")
    job.stamp_path.write_text(json.dumps({
        "fingerprint": fingerprint,
        "signature": list(written),
        "baked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }, indent=1) + "\n", encoding="utf-8")
    return seconds


def remove(job: BakeJob) -> None:
    """Delete the merged checkpoint and its stamp (after B is trained, on request)."""
    for path in (job.stamp_path, job.output):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
