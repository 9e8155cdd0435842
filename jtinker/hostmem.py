"""Host memory: glibc's allocator set up for XLA:CPU, once, when jtinker is imported.

Every XLA:CPU execution allocates its temporary buffer (hundreds of MB for a training step) and frees
it afterwards. glibc serves blocks that large with a fresh ``mmap`` each time, so every step
page-faults its whole working set in again: about 10% of a LoRA step on a 2-core machine. Keeping
freed memory instead (one arena, no ``mmap`` for large blocks, no trimming) reuses the same pages
every step. The process keeps its peak heap, as a GPU runtime keeps its memory pool.

This must happen before XLA starts its threads (they would get arenas of their own), so it runs when
this module is imported, first thing in ``import jtinker``. ``JTINKER_TUNE_MALLOC=0`` leaves the
allocator alone; on other C libraries this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

tuned = False  # whether tune_malloc() has changed the allocator in this process


def tune_malloc() -> bool:
    """Applies :data:`SETTINGS` with ``mallopt`` on glibc; returns whether the allocator is tuned."""
    global tuned
    if tuned or os.environ.get("JTINKER_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: other libcs read these differently
        return False
    tuned = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return tuned


tune_malloc()
