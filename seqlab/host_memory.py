"""Keep freed host memory in the process, so XLA:CPU stops paying page faults on every call.

XLA:CPU allocates each execution's temporaries as one large block with ``malloc`` and frees it when the call
returns. With glibc's defaults, allocations that large come from fresh ``mmap`` regions (and, on XLA's worker
threads, from per-thread arenas whose large requests also fall back to ``mmap``), and they go back to the OS on
``free``. Every call then touches freshly mapped pages: at T = 8k the gradient of a chunked linear-attention op
took 60k-70k minor page faults per call, about 150 ms of kernel time out of 250 ms (BENCHMARKS.md).

`retain_freed_memory` sets three glibc ``mallopt`` options for the process: one arena for every thread
(``M_ARENA_MAX``), no ``mmap`` for large blocks (``M_MMAP_MAX``), and no trimming of the heap top
(``M_TRIM_THRESHOLD``). Freed blocks then stay in the heap and the next call reuses them. The cost: the process
keeps its peak heap size until it exits, and with one arena XLA's compiler threads contend for the allocator lock
(a compile-bound test subset took 191 s against 177 s without the policy, so the test suite does not use it). Call
it at the very start of a program, before JAX runs anything (arenas that XLA's threads already made keep their old
policy): ``python -m seqlab.train`` (unless ``--noretain_host_memory``), ``experiments/bench_ops.py`` and
``experiments/softmax_memory.py`` do. The same policy for any process, set before it starts:
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Apply the policy above; returns False (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # M_TRIM_THRESHOLD takes an int that glibc reads as size_t: -1 means "never trim".
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
