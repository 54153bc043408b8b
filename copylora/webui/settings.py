"""The GUI's settings (sd-scripts folder, kohya's Python, output folder, language) in the user's config folder."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from copylora.errors import CopyloraError

FILE_NAME = "gui.json"


def config_dir() -> Path:
    """Where each OS keeps a user's settings: %APPDATA%, ~/Library/Application Support, $XDG_CONFIG_HOME."""
    if sys.platform == "win32":
        root = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support"
    else:
        root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "copylora"


def default_output_dir() -> Path:
    return Path.home() / "copylora-output"


@dataclass
class Settings:
    sd_scripts: str = ""
    python: str = ""
    output_dir: str = ""
    language: str = ""  # "" = the system's

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() if self.output_dir else default_output_dir()

    @property
    def uploads_path(self) -> Path:
        """Where the page's uploads go (Gradio's cache): inside the output folder, so that the one folder
        Gradio serves files from holds everything the page shows."""
        return self.output_path / ".gui_uploads"


def settings_path() -> Path:
    return config_dir() / FILE_NAME


def load(path: Path | None = None) -> Settings:
    """The saved settings; defaults when there is no file yet."""
    path = path or settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings()
    except (OSError, ValueError) as exc:
        raise CopyloraError(f"{path}: not a readable settings file ({exc}); fix or delete it") from exc
    known = {field.name for field in fields(Settings)}
    if not isinstance(data, dict):
        raise CopyloraError(f"{path}: not a settings file (expected a JSON object); fix or delete it")
    return Settings(**{key: str(value) for key, value in data.items() if key in known})


def save(settings: Settings, path: Path | None = None) -> Path:
    """Write the settings whole or not at all (temp file, then rename)."""
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(settings), handle, indent=1, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
