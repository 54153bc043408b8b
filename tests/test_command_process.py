"""What the command-line tools set up in their own process: freed memory stays in the heap (glibc:
a 16 MB block then comes from the heap instead of its own mapping; settings the user gave glibc
win), and the objects alive at the start are frozen out of the cyclic collector's sight."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="mallopt is glibc's")

# Prints keep_freed_memory()'s answer (when argv[1] == "set"), then how many blocks a 16 MB malloc mapped.
MAPPED_BLOCKS = """
import ctypes, sys
from copylora.runtime.command_process import keep_freed_memory
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "set":
    print(keep_freed_memory())
before = libc.mallinfo().hblks
block = libc.malloc(16 << 20)
print(libc.mallinfo().hblks - before)
libc.free(block)
"""


def run(mode: str, **extra_env: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS, mode], env={**env, **extra_env},
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


@glibc_only
def test_glibc_maps_a_16_mb_block_by_default():
    assert run("leave") == ["1"]


@glibc_only
def test_after_keep_freed_memory_it_comes_from_the_heap():
    assert run("set") == ["True", "0"]


@glibc_only
def test_a_setting_the_user_gave_glibc_wins():
    assert run("set", MALLOC_TRIM_THRESHOLD_="131072") == ["False", "1"]


FROZEN_AFTER_PREPARE = """
import gc
from copylora.runtime.command_process import prepare
before = gc.get_freeze_count()
prepare()
print(before == 0 and gc.get_freeze_count() > 1000)
"""


def test_prepare_freezes_the_objects_alive_at_the_start():
    done = subprocess.run([sys.executable, "-c", FROZEN_AFTER_PREPARE], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]


@pytest.mark.parametrize("module", ["copylora.merge", "copylora.resize", "copylora.copy_machine"])
def test_the_commands_prepare_their_process(module, monkeypatch):
    import importlib

    called = []
    command = importlib.import_module(module)
    monkeypatch.setattr(command.command_process, "prepare", lambda: called.append(True))
    monkeypatch.setattr(command, "run_cli", lambda prog, main, argv: 0)
    command.main([])
    assert called == [True]
