"""The command-line tools make idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) before torch loads
OpenMP, keep a policy the user set, and launch kohya's scripts without copylora's own default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records OMP_WAIT_POLICY at the moment torch is first imported, then imports the module in argv[1].
POLICY_WHEN_TORCH_LOADS = """
import importlib, os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY", "unset"))
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(seen[0] if seen else "torch never imported")
"""

KOHYA_CHILD_POLICY = """
from copylora.runtime.openmp_wait import environment_for_kohya
print(environment_for_kohya().get("OMP_WAIT_POLICY", "unset"))
"""


def run_python(code: str, *args: str, policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["copylora.merge", "copylora.resize", "copylora.inspect", "copylora.copy_machine"])
def test_passive_before_torch_loads(module):
    assert run_python(POLICY_WHEN_TORCH_LOADS, module, policy=None) == "PASSIVE"


def test_a_policy_the_user_set_wins():
    assert run_python(POLICY_WHEN_TORCH_LOADS, "copylora.merge", policy="ACTIVE") == "ACTIVE"


@pytest.mark.parametrize(("user", "kohya_gets"), [(None, "unset"), ("ACTIVE", "ACTIVE"), ("PASSIVE", "PASSIVE")])
def test_kohya_runs_with_the_users_setting_only(user, kohya_gets):
    assert run_python(KOHYA_CHILD_POLICY, policy=user) == kohya_gets
