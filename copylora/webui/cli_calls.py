"""How the page calls the commands: their own parsers and functions, their one-line errors in the page."""

from __future__ import annotations

import argparse
import functools
import inspect
import shlex
from pathlib import Path
from typing import Callable, NoReturn, ParamSpec, TypeVar

import gradio as gr

from copylora.errors import CopyloraError
from copylora.kohya.job import KohyaFailed

P = ParamSpec("P")
R = TypeVar("R")


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command's own parser, its errors as a CopyloraError instead of usage text and an exit."""

    def refuse(message: str) -> NoReturn:
        raise CopyloraError(message)

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(argv)


def shows_errors(prog: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A page action whose bad input shows the command's one line (`prog: error: …`) in the page,
    never a stack trace; gradio_client callers get the same line as the AppError's message."""

    def shown(exc: Exception) -> gr.Error:
        return gr.Error(f"{prog}: error: {exc}", duration=None, print_exception=False)

    def wrap(action: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(action):  # a streamed action fails while it is iterated

            @functools.wraps(action)
            def stream(*args: P.args, **kwargs: P.kwargs):  # type: ignore[no-untyped-def]
                try:
                    yield from action(*args, **kwargs)  # type: ignore[misc]
                except (CopyloraError, KohyaFailed) as exc:
                    raise shown(exc) from None

            return stream  # type: ignore[return-value]

        @functools.wraps(action)  # keeps the signature: gradio names the API's parameters from it
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return action(*args, **kwargs)
            except (CopyloraError, KohyaFailed) as exc:
                raise shown(exc) from None

        return run

    return wrap


def words(text: str | None) -> list[str]:
    """A field of several values ("1 -1", "0 0.5 1") as the command line would split it."""
    try:
        return shlex.split(text or "")
    except ValueError as exc:  # an unclosed quote
        raise CopyloraError(f"{text!r}: {exc}") from None


def paths(files: list[str] | str | None) -> list[str]:
    """A File field's value (one path, several, or none) as a list of paths."""
    if not files:
        return []
    return [files] if isinstance(files, str) else [str(f) for f in files]


def in_output_folder(save_to: str, output_dir: Path) -> Path:
    """save_to as the commands take it, except that a bare name goes into the output folder."""
    path = Path(save_to).expanduser()
    return path if path.is_absolute() else output_dir / path


def optional(flag: str, value: object) -> list[str]:
    """[flag, value] when the field is filled in (0 and "" mean: the command's default)."""
    if value is None or value == "" or value == 0:
        return []
    return [flag, f"{value:g}" if isinstance(value, float) else str(value)]
