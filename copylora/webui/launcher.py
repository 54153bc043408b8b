"""`copylora gui --write-launcher DIR`: a file to double-click that starts the GUI with this very Python
(the venv copylora is installed in) and opens the browser — copylora-gui.bat on Windows, .sh elsewhere."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from copylora.errors import CopyloraError

NAME = "copylora-gui"


def bat_text(python: str, options: list[str]) -> str:
    # chcp 65001: cmd reads the rest of the file as UTF-8 (a venv under a Japanese user name);
    # pause on failure so the window stays open with the message
    command = subprocess.list2cmdline([python, "-m", "copylora.gui", "--inbrowser", *options])
    return "\r\n".join([
        "@echo off",
        "chcp 65001 > nul",
        "rem written by `copylora gui --write-launcher`: starts copylora's GUI and opens the browser",
        f"{command} %*",
        "if errorlevel 1 pause",
        "",
    ])


def sh_text(python: str, options: list[str]) -> str:
    command = shlex.join([python, "-m", "copylora.gui", "--inbrowser", *options])
    return "\n".join([
        "#!/bin/sh",
        "# written by `copylora gui --write-launcher`: starts copylora's GUI and opens the browser",
        f'exec {command} "$@"',
        "",
    ])


def write_launcher(folder: Path, options: list[str], windows: bool = sys.platform == "win32",
                   python: str = sys.executable) -> Path:
    """Write the launcher into folder (created if missing); refuses to replace an existing file."""
    path = folder.expanduser().resolve() / (f"{NAME}.bat" if windows else f"{NAME}.sh")
    if path.exists():
        raise CopyloraError(f"{path}: already exists; delete it first to write a new one")
    text = bat_text(python, options) if windows else sh_text(python, options)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
