"""Paths and commands printed for the user to paste. Double quotes where they are enough: they
work the same in cmd.exe, PowerShell and POSIX shells (the pip hints use them too); a word they
cannot carry is quoted for this platform's shell (PowerShell on Windows, POSIX elsewhere)."""

from __future__ import annotations

import re
import shlex
import sys
from typing import Iterable

PLAIN = re.compile(r"[\w@%+=:,./-]+", re.ASCII)
DOUBLE_QUOTE_UNSAFE = re.compile(r'["$`\\!%]')  # expanded or ended inside "..." by some shell


def quote(word: str, windows: bool = sys.platform == "win32") -> str:
    """One word, quoted so that spaces, quotes and non-ASCII folder names survive pasting."""
    if PLAIN.fullmatch(word):
        return word
    if not DOUBLE_QUOTE_UNSAFE.search(word):
        return f'"{word}"'
    if windows:
        return "'" + word.replace("'", "''") + "'"
    return shlex.quote(word)


def join(words: Iterable[str], windows: bool = sys.platform == "win32") -> str:
    return " ".join(quote(str(word), windows) for word in words)
