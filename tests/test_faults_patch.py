"""Fault injection for `copylora patch`: any sequence of status/install/uninstall (with and without
--force), with the shim edited in any way in between and the script replaced by an update, never
loses the bytes of any script the user had: after every step they are in some file in networks/.
Also: a read-only networks/ and racing processes give one line, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copylora import patch
from copylora.errors import CopyloraError
from copylora.kohya import checkout as sd_checkout
from tests.faults_common import assert_one_line_outcome, read_only_folder
from tests.test_patch import NETWORKS, STANDIN_ORIGINAL, make_checkout

REPO = Path(__file__).resolve().parent.parent
TARGET = "svd_merge_lora.py"

COMMANDS = {
    "status": lambda root: sd_checkout.statuses(root),
    "install": lambda root: sd_checkout.install_all(root),
    "install --force": lambda root: sd_checkout.install_all(root, force=True),
    "uninstall": lambda root: sd_checkout.uninstall_all(root),
    "uninstall --force": lambda root: sd_checkout.uninstall_all(root, force=True),
}

# ways to edit the shim: the first-line edits editors and users make, and any splice of bytes
NAMED_EDITS = {
    "bom": lambda data: b"\xef\xbb\xbf" + data,
    "shebang": lambda data: b"#!/usr/bin/env python\n" + data,
    "encoding-line": lambda data: b"# -*- coding: utf-8 -*-\n" + data,
    "marker-deleted": lambda data: data.split(b"\n", 1)[-1],
    "crlf": lambda data: data.replace(b"\n", b"\r\n"),
    "emptied": lambda data: b"",
    "rewritten": lambda data: b"print('my own script now')\n",
}


@st.composite
def splices(draw) -> tuple[str, float, int, bytes]:
    """Delete `length` bytes at a fraction of the file and insert `insert` there."""
    return "splice", draw(st.floats(0, 1)), draw(st.integers(0, 4000)), draw(st.binary(max_size=40))


STEPS = st.one_of(
    st.sampled_from(sorted(COMMANDS)).map(lambda name: ("command", name)),
    st.sampled_from(sorted(NAMED_EDITS)).map(lambda name: ("edit", name)),
    splices(),
    st.just(("update", None)),  # an sd-scripts update or git checkout puts a newer stock script over the shim
)


def files_bytes(networks: Path) -> list[bytes]:
    return [p.read_bytes() for p in networks.iterdir() if p.is_file()]


def apply(step: tuple, root: Path, precious: list[bytes]) -> None:
    networks, (kind, what, *rest) = root / NETWORKS, step
    target = networks / TARGET
    if kind == "command":
        try:
            COMMANDS[what](root)
        except CopyloraError:
            pass  # refusing is allowed; losing bytes is not
        return
    current = target.read_bytes() if target.exists() else None
    if current is None or current in precious:
        return  # these change the shim (edited or not); what the user does to their own script is theirs
    if kind == "update":
        newer = STANDIN_ORIGINAL + f"# upstream update {len(precious)}\n".encode()
        target.write_bytes(newer)
        precious.append(newer)  # the user's script now too
    elif kind == "edit":
        target.write_bytes(NAMED_EDITS[what](current))
    else:
        length, insert = rest
        at = int(what * len(current))
        target.write_bytes(current[:at] + insert + current[at + length :])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEPS, min_size=1, max_size=8))
def test_no_sequence_of_commands_and_edits_loses_a_script(tmp_path_factory, steps) -> None:
    root = make_checkout(tmp_path_factory.mktemp("patch") / "sd-scripts")
    networks = root / NETWORKS
    precious = [STANDIN_ORIGINAL]
    for index, step in enumerate(steps):
        apply(step, root, precious)
        present = files_bytes(networks)
        for data in precious:
            assert data in present, (steps[: index + 1], sorted(p.name for p in networks.iterdir()))
        assert not [p for p in networks.iterdir() if p.name.endswith(".tmp")]
    # and whatever the sequence, the scripts can always be brought back to a script of the user's
    try:
        sd_checkout.uninstall_all(root, force=True)
    except CopyloraError:
        pass
    assert all(data in files_bytes(networks) for data in precious)


def test_a_read_only_networks_folder_is_one_line(tmp_path: Path, capsys) -> None:
    with read_only_folder(tmp_path / "ro") as (folder, make_read_only):
        root = make_checkout(folder / "sd-scripts")
        before = {p.name: p.read_bytes() for p in (root / NETWORKS).iterdir()}
        make_read_only()
        for action, expected in (("install", 2), ("uninstall", 0), ("status", 1)):
            code = patch.main([action, "--sd-scripts", str(root)])
            err = capsys.readouterr().err
            assert_one_line_outcome(code, err, (expected,))
            if action == "install":
                assert "could not write it" in err and str(root / NETWORKS) in err
        assert {p.name: p.read_bytes() for p in (root / NETWORKS).iterdir()} == before


def test_racing_processes_keep_the_original(tmp_path: Path) -> None:
    """Two `patch` processes at once, install against uninstall --force, a few rounds."""
    root = make_checkout(tmp_path / "sd-scripts")
    networks = root / NETWORKS
    for _ in range(4):
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(root)], env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for code in (
                "import sys; from pathlib import Path; from copylora.kohya import checkout as c; "
                "c.install_all(Path(sys.argv[1]))",
                "import sys; from pathlib import Path; from copylora.kohya import checkout as c; "
                "c.uninstall_all(Path(sys.argv[1]), force=True)",
            )
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "Traceback" not in err, err
        assert STANDIN_ORIGINAL in files_bytes(networks)
        assert not [p for p in networks.iterdir() if p.name.endswith(".tmp")]
