"""Memory the merge frees stays in the process's heap for its next allocation (glibc only).

The engine allocates and frees a few MB of temporaries per batch of modules. glibc returns freed
memory above its adaptive thresholds to the kernel, and every page of the next batch's
temporaries then faults in again: the SDXL merge took about 15 % longer that way
(bench/README.md, "Merge core"). The command-line entry points call keep_freed_memory() first.
Settings the user gave glibc (MALLOC_*_ environment variables, GLIBC_TUNABLES) win; on other C
libraries (Windows, macOS, musl) there is nothing to set.
"""

from __future__ import annotations

import ctypes
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

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
