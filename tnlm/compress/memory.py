"""Resident memory of this process, as the compression jobs report it per stage.

A stage's peak is measured from its start: :func:`release_memory` hands the memory the
previous stage freed back to the operating system, :func:`reset_peak_rss` starts a new
peak at the resident memory left, and :func:`peak_rss_mb` reads it at the stage's end::

    release_memory(); reset_peak_rss()
    ...                      # the stage
    peak = peak_rss_mb()     # MiB, this stage's live memory at its highest

Without the release, memory that the allocator kept after an earlier stage (glibc keeps
freed small blocks in its heaps: 29 MiB after SmolLM2-135M's dense perplexity, measured)
counts in every later stage's peak although no tensor uses it.

Linux reports the peak since a reset (``VmHWM``, reset through ``/proc/self/clear_refs``);
elsewhere :func:`peak_rss_mb` is the whole run's ``ru_maxrss`` and the reset does nothing.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any

__all__ = ["rss_mb", "peak_rss_mb", "reset_peak_rss", "release_memory", "start_stage",
           "mmap_large_allocations", "MMAP_THRESHOLD"]

#: :func:`mmap_large_allocations`' default: blocks from 128 KiB up get their own mapping
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field in MiB (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux ``VmRSS``; None elsewhere)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB since it started or since the last
    :func:`reset_peak_rss` (Linux ``VmHWM``; elsewhere the whole run's ``ru_maxrss``;
    None where unknown)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    except Exception:  # pragma: no cover - not on every platform
        return None


def reset_peak_rss() -> bool:
    """Start a new peak for :func:`peak_rss_mb` at the current resident memory (Linux
    ``clear_refs``); False where the peak cannot be reset (it then covers the whole run)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _libc_function(name: str, argtypes: list, restype: Any) -> Any:
    """The C library function ``name`` of the running process (glibc's ``malloc_trim``,
    ``mallopt``) with its signature set, or None (another C library, another platform)."""
    try:
        fn = getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):  # TypeError: Windows wants a name
        return None
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = restype
    return fn


_TRIM = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def release_memory() -> bool:
    """Collect Python's unreachable objects and give the C heap's free memory back to the
    operating system (glibc ``malloc_trim(0)``: free pages anywhere in the heaps, not only
    at their top). Changes no tensor; later allocations ask the system again.

    Returns:
        True where the heap was trimmed (glibc), False where only ``gc.collect()`` ran.
    """
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def start_stage() -> bool:
    """:func:`release_memory`, then :func:`reset_peak_rss`: the next :func:`peak_rss_mb`
    is the highest live memory from here on. Returns :func:`reset_peak_rss`'s result."""
    release_memory()
    return reset_peak_rss()


def mmap_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own memory
    mapping, returned to the system when freed (``mallopt(M_MMAP_THRESHOLD, threshold)``,
    which also turns off glibc's dynamic threshold). Affects the whole process from now on.

    By default glibc raises that threshold each time a mapped block is freed (up to 32 MiB),
    so the many tensors of a few MiB that a training step allocates and frees come from
    its heaps afterwards, and holes between live blocks stay resident. Measured on healing
    SmolLM2-135M (``benchmarks/bench_llm_memory.py``, 10 steps, docs/results.md): the
    healing stage's peak 2594 MB with glibc's default, 1897 MB with a fixed 128 KiB
    threshold (``MALLOC_MMAP_THRESHOLD_=131072``, the same setting). The whole 60 % job
    (``tnlm compress --low-memory``, which calls this): healing peak 2.06x the memory
    after loading instead of 3.07x, but healing 1.7x slower and perplexity 1.5x slower
    (every large tensor is a fresh mapping, faulted in and zeroed page by page), so it is
    an option, not the job's default.

    A threshold the user set in the environment (``MALLOC_MMAP_THRESHOLD_``) is left as it
    is. glibc cannot turn its dynamic threshold back on: call this in a process that
    compresses.

    Returns:
        True where the setting was made (glibc), False elsewhere or when the environment
        sets the threshold (nothing changes).

    Raises:
        ValueError: ``threshold`` not an int >= 4096.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 4096:
        raise ValueError(f"threshold must be an int >= 4096 (bytes), got {threshold!r}")
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))
