"""glibc's heap settings for processes that train: freed memory is kept for the next step.

A training step allocates its activations and gradients afresh. With glibc's defaults an
array above 128 KiB is a new mapping (and freed heap above 128 KiB goes back to the
kernel), so every step faults its pages in again. Measured here (one thread): the suite's
PNN-on-DS-CNN check (5 tasks of host training, then bundle and evaluation) run alone took
43.8 s, 12.5 s of it system time; with these settings 30.7 s, 1.4 s system. The peak is
the step's own either way; what is kept is freed memory up to ``TRIM_THRESHOLD``.

The learner's child gets them as environment variables (read by glibc at start,
``learner.child_env``); a process already running sets them with :func:`keep_freed_heap`
(``mallopt``), as ``models.training.train`` does (every host training: CLI, benches,
tests). Elsewhere (musl, macOS) nothing happens. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 32 << 20  # arrays below this come from the heap
TRIM_THRESHOLD = 64 << 20  # freed heap up to this stays with the process
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_heap() -> bool:
    """Apply the thresholds to this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has mallopt as a no-op stub)
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(ok) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
