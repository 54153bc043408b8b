"""What every tab is built with: the language's texts and the settings (which Settings can change)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from copylora.webui.i18n import Texts
from copylora.webui.settings import Settings


@dataclass
class Page:
    texts: Texts
    settings: Settings

    @property
    def output_dir(self) -> Path:
        return self.settings.output_path

    def servable(self, path: Path) -> Path | None:
        """path when the page may offer it for download (it lies in the output folder), else None."""
        path = path.resolve()
        return path if path.is_file() and path.is_relative_to(self.output_dir.resolve()) else None
