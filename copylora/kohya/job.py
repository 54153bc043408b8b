"""One kohya training run: planned (checked, nothing written), prepared, launched, its LoRA verified.

copylora trains nothing itself: it writes a dataset folder and a --config_file TOML, then runs
`python -m accelerate.commands.launch [ACCELERATE ARGS] SCRIPT --config_file TOML` in the sd-scripts
checkout, with kohya's output going straight to the terminal. accelerate keeps --num_processes
(multi-GPU) open to those who have it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from copylora.errors import CopyloraError
from copylora.formats.lora_file import LoraFile, read_lora
from copylora.kohya import dataset
from copylora.kohya.base_model import check_base_model
from copylora.kohya.options import FinalConfig, KohyaOptions, Preset, build_config, dumps_toml
from copylora.runtime.openmp_wait import environment_for_kohya

LAUNCHER = ["-m", "accelerate.commands.launch"]  # `accelerate launch`, from the same Python


class KohyaFailed(Exception):
    """kohya exited non-zero: its own output has said why; copylora exits with its code."""

    def __init__(self, script: str, code: int):
        super().__init__(f"kohya's {script} exited with code {code} (its output is above)")
        self.code = code


VENV_PYTHONS = ("venv/bin/python", "venv/Scripts/python.exe")  # POSIX, Windows


def default_python(sd_scripts: Path) -> str:
    """The checkout's venv (kohya's install makes one), Kohya's GUI's venv one level up, else this Python."""
    for root in (sd_scripts, sd_scripts.parent):
        for relative in VENV_PYTHONS:
            if (root / relative).is_file():
                return str(root / relative)
    return sys.executable


def kohya_python(given: str | None, sd_scripts: Path) -> str:
    """--python as the user meant it: a path is taken from the caller's folder (kohya runs in the checkout,
    where a relative path would point elsewhere), a bare name is looked up on PATH as usual."""
    if given is None:
        return default_python(sd_scripts)
    if "/" in given or "\\" in given or given.startswith("~"):
        # abspath, not resolve(): a venv's python is a symlink, and its target is not the venv
        return os.path.abspath(os.path.expanduser(given))
    return given


def run_kohya(command: list[str], sd_scripts: Path, script: str) -> float:
    """Run one kohya command in the checkout, its output straight to the terminal; the seconds it took."""
    started = time.monotonic()
    try:
        code = subprocess.run(command, cwd=sd_scripts, env=environment_for_kohya()).returncode
    except OSError as exc:
        raise CopyloraError(f"{command[0]}: cannot run it ({exc.strerror})") from exc
    if code != 0:
        raise KohyaFailed(script, code)
    return time.monotonic() - started


def kohya_options(sd_scripts: Path, python: str, script: str, dump: Path | None) -> KohyaOptions:
    """The script's options: from a parser dump if given, else from the script itself."""
    if dump is None:
        return KohyaOptions.probe(python, sd_scripts, script)
    options = KohyaOptions.from_json(dump)
    if options.script != script:
        raise CopyloraError(f"{dump}: a dump of {options.script}'s options, but the preset trains with {script}")
    return options


def cuda_available(options: KohyaOptions) -> bool:
    if options.cuda is not None:
        return options.cuda
    import torch  # a dump without the answer: ask this Python's torch

    return torch.cuda.is_available()


@dataclass
class TrainJob:
    sd_scripts: Path
    python: str
    script: str
    images: list[dataset.Image]
    num_repeats: int
    output_dir: Path
    name: str
    config: FinalConfig
    accelerate_args: list[str] = field(default_factory=list)
    base_fingerprint: str | None = None  # the base's identity when it is made by an earlier step

    @property
    def train_data_dir(self) -> Path:
        return self.output_dir / f"{self.name}_dataset"

    @property
    def config_path(self) -> Path:
        return self.output_dir / f"{self.name}.toml"

    @property
    def lora_path(self) -> Path:
        return self.output_dir / f"{self.name}.safetensors"

    @property
    def stamp_path(self) -> Path:
        return self.output_dir / f"{self.name}.copylora.json"

    @property
    def command(self) -> list[str]:
        return [self.python, *LAUNCHER, *self.accelerate_args, self.script, "--config_file", str(self.config_path)]

    @property
    def toml_text(self) -> str:
        return dumps_toml(
            self.config.keys,
            [f"written by copylora for kohya's {self.script}; every key checked against its options",
             f"dataset: {dataset.subset_dir(self.train_data_dir, self.num_repeats)} "
             f"({len(self.images)} image(s) x {self.num_repeats} repeats, no caption)"],
        )

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes the trained LoRA does: script, config, repeats, image bytes."""
        state = {
            "script": self.script,
            "config": self.config.keys,
            "num_repeats": self.num_repeats,
            "images": [[image.path.name, image.sha256] for image in self.images],
        }
        if self.base_fingerprint is not None:
            state["base"] = self.base_fingerprint
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        """What --dry-run prints: the layout, the exact command and the TOML."""
        subset = dataset.subset_dir(self.train_data_dir, self.num_repeats)
        lines = [f"# dataset: {subset}/ (no caption files)"]
        lines += [f"#   {image.path.name}  <- {image.path} ({image.width}x{image.height})" for image in self.images]
        lines += [f"# command, run in {self.sd_scripts}:", shlex.join(self.command), f"# {self.config_path}:"]
        return "\n".join(lines) + "\n" + self.toml_text


def plan(
    sd_scripts: Path,
    python: str,
    options: KohyaOptions,
    preset: Preset,
    sets: list[str],
    base: Path,
    images: Path,
    output_dir: Path,
    name: str,
    accelerate_args: list[str],
    base_to_come: bool = False,
) -> TrainJob:
    """Check everything and decide the config; writes nothing. base_to_come: an earlier step makes the base."""
    if not base_to_come:
        check_base_model(base)
    if not name or Path(name).name != name:
        raise CopyloraError(f"--name {name!r}: a file name without folders, please")
    checked = dataset.check_images(dataset.find_images(images))
    output_dir = output_dir.resolve()
    owned = {
        "pretrained_model_name_or_path": str(base.resolve()),
        "train_data_dir": str(output_dir / f"{name}_dataset"),
        "output_dir": str(output_dir),
        "output_name": name,
    }
    config = build_config(preset, sets, options, owned, cuda_available(options))
    return TrainJob(sd_scripts, python, preset.script, checked, preset.num_repeats, output_dir, name, config,
                    list(accelerate_args))


def prepare(job: TrainJob) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    dataset.lay_out(job.images, job.train_data_dir, job.num_repeats)
    job.config_path.write_text(job.toml_text, encoding="utf-8")


def train(job: TrainJob) -> tuple[LoraFile, float]:
    """Prepare, run kohya, and check that it wrote a LoRA; returns it and the seconds kohya took."""
    prepare(job)
    before = signature(job.lora_path)
    seconds = run_kohya(job.command, job.sd_scripts, job.script)
    if not job.lora_path.is_file() or signature(job.lora_path) == before:
        raise CopyloraError(f"{job.lora_path}: kohya's {job.script} exited 0 but did not write this file")
    lora = read_lora(job.lora_path)
    job.stamp_path.write_text(json.dumps({
        "fingerprint": job.fingerprint,
        "lora_sha256": file_sha256(job.lora_path),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }, indent=1) + "\n", encoding="utf-8")
    return lora, seconds


def reusable(job: TrainJob) -> dict | None:
    """The stamp of an earlier run whose LoRA is still there and came from the same images and config."""
    try:
        stamp = json.loads(job.stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != job.fingerprint or not job.lora_path.is_file():
        return None
    return stamp if stamp.get("lora_sha256") == file_sha256(job.lora_path) else None


def signature(path: Path) -> tuple[int, int] | None:
    """(mtime_ns, size): changes when a file is rewritten; cheap for files too big to hash on every run."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
