"""`copylora gui`: the copy-machine workflow, merge, resize, inspect and preview in a local web page (Gradio).

    copylora gui [--lang ja|en] [--port 7870] [--output-dir DIR] [--inbrowser]
    copylora gui --host 0.0.0.0 --auth USER:PASS      # other machines may connect: only with a password
    copylora gui --write-launcher DIR                 # a double-click launcher (.bat on Windows, .sh elsewhere)

Needs the optional [gui] extra (Gradio). Every tab runs the same functions as its command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Sequence

from copylora.errors import CopyloraError, run_cli, shown
from copylora.runtime.cli_help import DefaultsHelpFormatter

PROG = "copylora.gui"
INSTALL = 'pip install "copylora[gui]"'
DEFAULT_PORT = 7870  # not 7860: Kohya's GUI and A1111 take that one
LOOPBACK_NAMES = ("localhost",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=shown(PROG), description="The copy-machine workflow in a local web page (Gradio).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any but this machine's own needs --auth")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument("--auth", metavar="USER:PASS", help="the user name and password the page asks for")
    parser.add_argument("--lang", choices=["en", "ja"], default=None,
                        help="the page's language (default: Settings', else the system's)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="where results go, and the only folder the page serves files from "
                             "(default: Settings', else ~/copylora-output)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the browser")
    parser.add_argument("--write-launcher", type=Path, metavar="DIR",
                        help="write a double-click launcher for this Python into DIR and exit")
    return parser


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def credentials(host: str, auth: str | None) -> tuple[str, str] | None:
    """--auth as (user, password); refuses to listen beyond this machine without one."""
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise CopyloraError("--auth: give USER:PASS, both non-empty")
        return user, password
    if not is_loopback(host):
        raise CopyloraError(f"--host {host}: other machines could use the page (and run kohya on this one); "
                            f"give --auth USER:PASS too, or leave --host at 127.0.0.1")
    return None


def launcher_options(args: argparse.Namespace) -> list[str]:
    """The options given with --write-launcher that the launcher passes on (never --auth: a password
    does not belong in a file)."""
    if args.auth is not None:
        raise CopyloraError("--auth with --write-launcher: a password does not belong in a launcher file; "
                            "give --auth when you start the GUI")
    options = []
    if args.host != "127.0.0.1":
        options += ["--host", args.host]
    if args.port != DEFAULT_PORT:
        options += ["--port", str(args.port)]
    if args.lang is not None:
        options += ["--lang", args.lang]
    if args.output_dir is not None:
        options += ["--output-dir", str(args.output_dir.expanduser().resolve())]
    return options


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CopyloraError(f"the GUI needs Gradio, which is not installed: {INSTALL}") from None


def run(args: argparse.Namespace) -> int:
    if args.write_launcher is not None:
        from copylora.webui.launcher import write_launcher

        print(write_launcher(args.write_launcher, launcher_options(args)))
        return 0
    auth = credentials(args.host, args.auth)
    require_gradio()
    from copylora.webui import settings as gui_settings
    from copylora.webui.i18n import Texts, system_language

    settings = gui_settings.load()
    if args.output_dir is not None:
        settings.output_dir = str(args.output_dir.expanduser().resolve())
    language = args.lang or settings.language or system_language()
    # Gradio keeps uploads in its cache folder and serves them: put it inside the output folder, the one
    # folder the page serves; read when gradio loads, so set before that. No usage statistics are sent.
    os.environ["GRADIO_TEMP_DIR"] = str(settings.uploads_path)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from copylora.webui.app import build_app, serve
    from copylora.webui.page import Page

    page = Page(Texts(language), settings)
    serve(build_app(page), page, args.host, args.port, auth, args.inbrowser)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
