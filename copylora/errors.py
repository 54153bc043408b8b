"""The one error type users see, the wrapper that turns it into a one-line message, and the
name each command's lines are prefixed with (the form the user ran)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Callable, Iterator, Sequence

EXIT_USAGE = 2  # argparse's own code for bad arguments; we use it for every bad input
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a writer ended by SIGPIPE, as `yes | head` does

_run_by_console_script = False


@contextlib.contextmanager
def run_by_console_script() -> Iterator[None]:
    """Around a command the `copylora` console script runs: it names itself `copylora merge`."""
    global _run_by_console_script
    _run_by_console_script = True
    try:
        yield
    finally:
        _run_by_console_script = False


def shown(prog: str) -> str:
    """How the user ran the command whose module is `prog` (e.g. "copylora.copy_machine"):
    `copylora copy-machine` through the console script, else `python -m copylora.copy_machine`."""
    if prog == "copylora":
        return prog
    if _run_by_console_script:
        return "copylora " + prog.removeprefix("copylora.").replace("_", "-")
    return "python -m " + prog


class CopyloraError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2.

    The message should name the file (and module) and say what is wrong.
    """

    def __str__(self) -> str:
        # a file name may hold a newline or another control character: escaped, it stays one line
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in super().__str__())


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main(); a CopyloraError becomes `prog: error: message` and exit code 2;
    a reader that closes the output early (`| head`) ends the command quietly."""
    try:
        code = main(argv)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except CopyloraError as exc:
        logging.getLogger("copylora").debug("error", exc_info=True)
        print(f"{shown(prog)}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{shown(prog)}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point it at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
