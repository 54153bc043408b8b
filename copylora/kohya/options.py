"""Presets, kohya's option lists, and the final `--config_file` TOML that copylora hands to kohya.

kohya's read_config_from_file() flattens one level of tables and puts every key into the
argparse namespace, so a misspelt key is ignored without a word and a value skips the option's
type conversion. Here every key is checked against the target script's own parser (a dump, see
_probe.py), converted to the option's type, and checked against its choices.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copylora.errors import CopyloraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

def _presets_dir() -> Path:
    """configs/ of a source checkout or editable install, else the copy a wheel ships as copylora/configs."""
    package = Path(__file__).resolve().parent.parent  # copylora/
    source = package.parent / "configs"
    return source if source.is_dir() else package / "configs"


PRESETS_DIR = _presets_dir()
SD15_PRESET = "copy_machine_sd15"
SDXL_PRESET = "copy_machine_sdxl"
SCRIPTS = ("train_network.py", "sdxl_train_network.py")
COPYLORA_TABLE = "copylora"  # the preset table copylora reads itself and never hands to kohya
COPYLORA_KEYS = {"script", "num_repeats"}
# Keys copylora sets from its own arguments; a preset or --set must not set them.
OWNED_KEYS = {
    "pretrained_model_name_or_path": "--base",
    "train_data_dir": "--images",
    "output_dir": "--output-dir",
    "output_name": "--name",
    "dataset_config": "--images (copylora lays out the dataset itself)",
    "config_file": "copylora (it writes the config file)",
    "output_config": "copylora (it would make kohya write a config and train nothing)",
}
LIMIT_KEYS = ("max_train_steps", "max_train_epochs")

Value = Any  # str | int | float | bool | list of those


def load_toml(path: Path) -> dict[str, Any]:
    if tomllib is None:
        raise CopyloraError(f"{path}: reading TOML needs Python 3.11 or the tomli package (pip install tomli)")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise CopyloraError(f"{path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CopyloraError(f"{path}: not valid TOML ({exc})") from exc


# ---------------------------------------------------------------- kohya's options


@dataclass(frozen=True)
class Option:
    dest: str
    action: str
    type: str | None
    nargs: int | str | None
    choices: tuple | None

    @property
    def is_flag(self) -> bool:
        return self.action in ("_StoreTrueAction", "_StoreFalseAction")

    @property
    def is_list(self) -> bool:
        return self.nargs in ("*", "+") or isinstance(self.nargs, int) and self.nargs > 1


@dataclass
class KohyaOptions:
    """The options of one kohya script, as its parser has them (a config key is an option's dest)."""

    script: str
    source: str
    options: dict[str, Option]
    cuda: bool | None  # whether the Python that trains sees CUDA; None: the dump does not say

    @classmethod
    def from_json(cls, path: Path) -> KohyaOptions:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            options = {
                o["dest"]: Option(o["dest"], o["action"], o["type"], o["nargs"], _tuple(o["choices"]))
                for o in data["options"]
                if o["action"] != "_HelpAction"
            }
            return cls(data["script"], data.get("source", str(path)), options, data.get("cuda"))
        except OSError as exc:
            raise CopyloraError(f"{path}: cannot read ({exc.strerror})") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise CopyloraError(f"{path}: not a kohya parser dump (script, options: flags, dest, action, …)") from exc

    @classmethod
    def probe(cls, python: str, sd_scripts: Path, script: str) -> KohyaOptions:
        """Ask the script's setup_parser(), imported by the Python that will train."""
        probe = Path(__file__).with_name("_probe.py")
        with tempfile.TemporaryDirectory(prefix="copylora-probe-") as tmp:
            out = Path(tmp) / "options.json"
            try:
                # -c, not the file's path: run by path, copylora/ would lead sys.path and its
                # inspect.py would shadow the standard library's for everything kohya imports
                done = subprocess.run(
                    [python, "-c", probe.read_text(encoding="utf-8"), str(sd_scripts), script, str(out)],
                    cwd=sd_scripts, capture_output=True, text=True, errors="replace", timeout=600,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CopyloraError(f"{python}: cannot run it to read {script}'s options ({exc})") from exc
            if done.returncode != 0 or not out.exists():
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                last = lines[-1].strip() if lines else f"exit code {done.returncode}"
                raise CopyloraError(
                    f"{sd_scripts / script}: could not read its options with {python} ({last}); "
                    "pass the checkout's Python with --python, or a parser dump with --kohya-args FILE"
                )
            return cls.from_json(out)

    def closest(self, key: str) -> str | None:
        matches = difflib.get_close_matches(key.replace("-", "_").lower(), self.options, n=1, cutoff=0.6)
        return matches[0] if matches else None

    def check(self, key: str, value: Value, origin: str) -> Value:
        """The value converted to the option's type; CopyloraError naming `origin` if it cannot be."""
        option = self.options.get(key)
        if option is None:
            near = self.closest(key)
            hint = f"; did you mean {near}?" if near else ""
            raise CopyloraError(
                f"{origin}: {key} is not an option of {self.script} (kohya would ignore it silently){hint}"
            )
        if option.is_flag:
            if not isinstance(value, bool):
                raise CopyloraError(f"{origin}: {key} is a switch: use true or false, not {value!r}")
            return value
        if option.is_list:
            items = value if isinstance(value, list) else [value]
            return [self._converted(option, item, origin) for item in items]
        if isinstance(value, list):
            raise CopyloraError(f"{origin}: {key} takes one value, not a list")
        return self._converted(option, value, origin)

    def _converted(self, option: Option, value: Value, origin: str) -> Value:
        def bad(kind: str) -> CopyloraError:
            return CopyloraError(f"{origin}: {option.dest} = {value!r}: {self.script} wants {kind}")

        if isinstance(value, (dict, list)):
            raise bad("a plain value")
        if option.type in ("int", "float", "int_or_float"):
            if isinstance(value, bool):
                raise bad(f"a number ({option.type})")
            value = _number(value)
            if value is None:
                raise bad(f"a number ({option.type})")
            if option.type == "int":
                if float(value).is_integer():
                    value = int(value)
                else:
                    raise bad("an integer")
            elif option.type == "float":
                value = float(value)
        else:  # kohya parses str options itself (resolution "600,900"), so a number becomes its text
            if isinstance(value, bool):
                raise bad("text")
            value = str(value)
        if option.choices is not None and value not in option.choices:
            raise bad("one of " + ", ".join(map(str, option.choices)))
        return value


def _number(value: Value) -> int | float | None:
    if isinstance(value, (int, float)):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return None


def _tuple(choices: list | None) -> tuple | None:
    return None if choices is None else tuple(choices)


# ---------------------------------------------------------------- presets


@dataclass
class Preset:
    path: Path
    script: str
    num_repeats: int
    keys: dict[str, Value]  # kohya keys, tables flattened as kohya does


def preset_path(name_or_file: str | None, sdxl: bool) -> Path:
    """A shipped preset by name (configs/NAME.toml) or any TOML file."""
    if name_or_file is None:
        name_or_file = SDXL_PRESET if sdxl else SD15_PRESET
    given = Path(name_or_file).expanduser()
    if given.suffix == ".toml" or given.exists() or len(given.parts) > 1:
        if not given.is_file():
            raise CopyloraError(f"{given}: no such preset file")
        return given
    shipped = PRESETS_DIR / f"{name_or_file}.toml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))) or "none"
        raise CopyloraError(f"{shipped}: no such preset (shipped presets: {names})")
    return shipped


def load_preset(path: Path, sdxl: bool) -> Preset:
    data = load_toml(path)
    own = data.pop(COPYLORA_TABLE, {})
    if not isinstance(own, dict):
        raise CopyloraError(f"{path}: {COPYLORA_TABLE} must be a table ([{COPYLORA_TABLE}])")
    unknown = sorted(set(own) - COPYLORA_KEYS)
    if unknown:
        raise CopyloraError(f"{path}: [{COPYLORA_TABLE}] {unknown[0]} is not a copylora key ({', '.join(sorted(COPYLORA_KEYS))})")
    script = own.get("script", SCRIPTS[1] if sdxl else SCRIPTS[0])
    if script not in SCRIPTS:
        raise CopyloraError(f"{path}: [{COPYLORA_TABLE}] script must be one of {', '.join(SCRIPTS)}, not {script!r}")
    if sdxl and script != SCRIPTS[1]:
        raise CopyloraError(f"{path}: this preset is for {script}, but --sdxl asks for {SCRIPTS[1]}")
    repeats = own.get("num_repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CopyloraError(f"{path}: [{COPYLORA_TABLE}] num_repeats must be a whole number ≥ 1, not {repeats!r}")
    return Preset(path, script, repeats, _flattened(path, data))


def _flattened(path: Path, data: dict[str, Any]) -> dict[str, Value]:
    keys: dict[str, Value] = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        for key, item in items:
            if isinstance(item, dict):
                raise CopyloraError(f"{path}: [{name}.{key}]: kohya reads one level of tables, not nested ones")
            if key in keys:
                raise CopyloraError(f"{path}: {key} is set twice (kohya merges all tables into one)")
            keys[key] = item
    return keys


# ---------------------------------------------------------------- --set


def parse_set(text: str) -> tuple[str, Value | None]:
    """`key=value` → (key, value as TOML, else as text); `key=` → (key, None): remove the key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise CopyloraError(f"--set {text}: expected KEY=VALUE (KEY= removes a key)")
    raw = raw.strip()
    if not raw:
        return key, None
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


# ---------------------------------------------------------------- the final config


@dataclass
class FinalConfig:
    keys: dict[str, Value]
    warnings: list[str] = field(default_factory=list)


def build_config(
    preset: Preset, sets: list[str], options: KohyaOptions, owned: dict[str, str], cuda: bool
) -> FinalConfig:
    """Preset, then --set overrides, then copylora's own keys; every key checked against `options`."""
    if options.script != preset.script:
        raise CopyloraError(f"{preset.path}: this preset is for {preset.script}, but the options are {options.script}'s")
    keys = dict(preset.keys)
    origin = {key: str(preset.path) for key in keys}
    warnings: list[str] = []
    overrides = [parse_set(text) for text in sets]
    set_limits = {key for key, value in overrides if key in LIMIT_KEYS and value is not None}
    for key, value in overrides:
        if value is None:
            keys.pop(key, None)
            continue
        keys[key] = value
        origin[key] = f"--set {key}"
    if len(set_limits) == 1:  # --set max_train_steps=4 replaces the preset's epoch limit, and vice versa
        other = next(k for k in LIMIT_KEYS if k not in set_limits)
        if other in keys and other not in set_limits:
            warnings.append(f"{other} = {keys.pop(other)} from {origin[other]} dropped: --set {next(iter(set_limits))} replaces it")

    for key in keys:
        if key in OWNED_KEYS:
            raise CopyloraError(f"{origin[key]}: {key} is set by {OWNED_KEYS[key]}; remove it")
    final = {key: options.check(key, value, origin[key]) for key, value in keys.items()}
    for key, value in owned.items():
        final[key] = options.check(key, value, "copylora")

    present = [key for key in LIMIT_KEYS if final.get(key) is not None]
    if not present:
        raise CopyloraError(
            f"{preset.path}: sets neither max_train_steps nor max_train_epochs; kohya would train 1600 steps "
            "(set one, e.g. --set max_train_steps=4000)"
        )
    if len(present) == 2:
        raise CopyloraError(
            f"{origin['max_train_epochs']}: both max_train_steps and max_train_epochs are set; kohya would use "
            "max_train_epochs and ignore max_train_steps (keep one; --set KEY= removes a key)"
        )
    if final.get("save_model_as", "safetensors") != "safetensors":
        raise CopyloraError(f"{origin['save_model_as']}: save_model_as must be safetensors (copylora checks and merges those)")
    if not cuda and final.get("mixed_precision") == "fp16":
        final["mixed_precision"] = "no"
        warnings.append(
            "no CUDA here: mixed_precision fp16 replaced by no (fp16 autocast fails on a CPU; "
            "--set mixed_precision=bf16 to use bf16)"
        )
    return FinalConfig(final, warnings)


# ---------------------------------------------------------------- writing TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dumps_toml(keys: dict[str, Value], comments: list[str] = ()) -> str:
    """A flat TOML document (kohya flattens tables anyway), with leading comment lines."""
    lines = [f"# {comment}" for comment in comments]
    for key, value in keys.items():
        name = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
        lines.append(f"{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
