"""Host memory: glibc's allocator set up for XLA:CPU, once, when jtinker is imported.

Every XLA:CPU execution allocates its temporary buffer (hundreds of MB for a training step) and frees
it afterwards. glibc serves blocks that large with a fresh ``mmap`` each time, so every step
page-faults its whole working set in again: about 10% of a LoRA step on a 2-core machine. Keeping
freed memory instead (one arena, no ``mmap`` for large blocks, no trimming) reuses the same pages
every step. The process keeps its peak heap, as a GPU runtime keeps its memory pool.

This must happen before XLA starts its threads (they would get arenas of their own), so it runs when
this module is imported, first thing in ``import jtinker``. ``JTINKER_TUNE_MALLOC=0`` leaves the
allocator alone; on other C libraries this is a no-op.

Memory maps: XLA:CPU maps every kernel of a program on its own, so the sampler's programs for one
shape take 400-700 of the kernel's per-process limit (``vm.max_map_count``, 65,530 by default). A
long-lived process that meets enough shapes (a server, a test worker) runs out, and its next compile
fails ("Cannot allocate memory") or crashes it. :func:`release_programs_near_map_limit` drops the
compiled programs before that; they compile again when next used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import time

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


def memory_maps() -> int:
    """The memory mappings this process holds (0 where ``/proc`` does not say)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def map_limit() -> int:
    """The kernel's limit on a process's memory mappings (0 where ``/proc`` does not say)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


_last_map_check = -float("inf")


def release_programs_near_map_limit(fraction: float = 0.75, interval: float = 10.0) -> bool:
    """Drops every compiled JAX program (``jax.clear_caches``) once this process holds more than
    ``fraction`` of :func:`map_limit`; returns whether it did. Checks at most once per ``interval``
    seconds: listing the maps of a process near the limit takes milliseconds."""
    global _last_map_check
    now = time.monotonic()
    if now - _last_map_check < interval:
        return False
    _last_map_check = now
    limit = map_limit()
    if not limit or memory_maps() <= fraction * limit:
        return False
    import jax

    jax.clear_caches()
    gc.collect()  # executables are freed, and their kernels unmapped, with their last reference
    return True


tune_malloc()
