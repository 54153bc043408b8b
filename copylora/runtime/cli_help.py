"""`--help` that shows every option's default, for all of copylora's commands."""

from __future__ import annotations

import argparse
import re

NAMES_A_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends the help of each option that takes a value with "(default: X)".

    A help text that already names its default, or says "(required)", is kept as it is: that is
    how an option whose default is None says what leaving it out means ("(default: same as
    --precision)"), or that it cannot be left out (kohya's parsers make such options optional).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if NAMES_A_DEFAULT.search(text) or "(required)" in text or not takes_a_value(action):
            return text
        default = "none" if action.default in (None, [], "") else "%(default)s"
        return f"{text} (default: {default})"


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, with the description printed as written (for descriptions laid out by hand)."""


def takes_a_value(action: argparse.Action) -> bool:
    """An option (not a positional, flag or --help) that is not required: it has a default."""
    return bool(action.option_strings) and action.nargs != 0 and not action.required and action.default is not argparse.SUPPRESS
