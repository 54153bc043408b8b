"""Idle OpenMP threads sleep instead of spinning: imported by the command-line entry points first.

By default libgomp's idle threads spin for a while before sleeping. On a machine that is busy
with something else (a training run, a web UI) they steal the cores that the merge's other
threads wait for: the SD1.5 merge ran 10-25x slower with both cores busy, and no slower idle
with passive waiting (bench/README.md, "Busy CPU"). libgomp reads the setting once, when torch
loads it, so this module must be imported before torch; a value the user set wins.
"""

from __future__ import annotations

import os

_SET_BY_USER = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def environment_for_kohya() -> dict[str, str]:
    """This process's environment without copylora's own default: kohya's scripts (training on a
    GPU, generating) run with the settings their user gave them, not with the merge's."""
    env = dict(os.environ)
    if not _SET_BY_USER:
        env.pop("OMP_WAIT_POLICY", None)
    return env
