"""glibc allocator settings for the processes at either end of the rollout stream.

ZeroMQ's I/O thread mallocs a buffer for every large frame it receives (token ids, log-probs
and texts: ~0.25 MB each for 8 responses x 8k tokens), and the trainer frees it once the group
is validated. With glibc's defaults those buffers keep leaving the process: a frame over the
(dynamic) mmap threshold is unmapped on free, and a heap whose free top passes the trim
threshold (twice the mmap threshold, ~0.5 MB here) is trimmed. The next message then faults in
fresh zeroed pages: 35 minor faults per 8k group in the trainer of `tools/bench_stream.py`,
against 0 with these settings. Serving allocations up to 32 MiB from the heap and keeping up to
`transport.malloc_keep_mb` of freed memory at its top lets each message reuse the pages the
last one left (measured on the 2-core machine: the trainer's CPU per 8k group fell from 0.243 to
0.167 ms, and the 8k bench ratio rose from 0.84 to 0.95, with the same settings in the
baseline's processes).

Process-wide, so it is applied by the entry points (the trainer when it builds the stream
endpoint, `spark-mcore rollout-worker`), not by library constructors; left alone when the user
set glibc's own variables, and a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger requests
# are refused; allocations above it are mmapped whatever is set
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_chose() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(v in os.environ for v in _USER_SETTINGS) or "threshold" in tunables


def keep_freed_memory(keep_mb: int) -> bool:
    """Lets this process keep up to `keep_mb` MiB of freed heap memory and serve allocations up
    to 32 MiB from the heap (see the module docstring). Returns whether it changed anything:
    False for keep_mb <= 0, without glibc, or when MALLOC_*_ / GLIBC_TUNABLES thresholds are set."""
    if keep_mb <= 0 or platform.libc_ver()[0] != "glibc" or _user_chose():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # (mallopt returns 1 on success; fixing either threshold also stops glibc's dynamic one)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, keep_mb << 20))


__all__ = ["MMAP_THRESHOLD_MAX", "keep_freed_memory"]
