"""The one error type users see, and the wrapper that turns it into a one-line message."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2  # argparse's own code for bad arguments; we use it for every bad input


class CopyloraError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2.

    The message should name the file (and module) and say what is wrong.
    """


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main(); a CopyloraError becomes `prog: error: message` and exit code 2."""
    try:
        return main(argv)
    except CopyloraError as exc:
        logging.getLogger("copylora").debug("error", exc_info=True)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
