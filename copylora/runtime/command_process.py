"""How a command-line run sets up its own process: the entry points call prepare() first.

Two settings that make a short-lived process that has imported torch faster, and change no result:

- Memory the merge frees stays in the heap for its next allocation (glibc only). The engine
  allocates and frees a few MB of temporaries per batch of modules; glibc returned freed memory
  above its adaptive thresholds to the kernel, and every page of the next batch then faulted in
  again: the SDXL engine took about 15 % longer that way. Settings the user gave glibc
  (MALLOC_*_ variables, GLIBC_TUNABLES) win; other C libraries (Windows, macOS, musl) are left alone.
- The objects that exist when the command starts (torch's modules, classes and functions: about
  a million) are never garbage, so they are moved out of the cyclic collector's sight
  (gc.freeze): each full collection during the run, and the one at interpreter exit, skips them.
  That was about 0.1 s of collections during an SDXL merge and 0.4 s of the exit.

bench/README.md has the measurements; its I/O floor calls prepare() too, so the floor stays a
floor.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks below this come from the heap (glibc's maximum: 32 MB on 64-bit); larger ones, such as a
# whole group's output, are still mapped and unmapped on their own.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap is kept up to this much before it is given back.
TRIM_THRESHOLD = 1 << 30

USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def prepare() -> None:
    """Both settings below, for the process of one command."""
    keep_freed_memory()
    freeze_startup_objects()


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_MALLOC_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def freeze_startup_objects() -> None:
    """Treat every object alive now as permanent: the cyclic collector no longer scans them."""
    gc.freeze()
