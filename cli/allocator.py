"""Keep freed memory in the process (glibc): the command's big float64 temporaries are
allocated and freed over and over, and glibc's defaults return every large buffer to the
OS on free and fault it back in on the next allocation.

Measured with ``repfuse convert --timm repvgg_b3 --input-shape 1,3,224,224`` on a quiet
2-core machine (the two settings alternately, twice, ``/usr/bin/time``): 13.8 s and 14.4 s
instead of 15.9 s and 18.8 s, at a peak resident size of 3.26-3.28 GB instead of 2.53-2.54
GB, after the reduction stopped copying kernels for its sums and the comparisons stopped
allocating kernel-sized differences (before: 18.9 s and 18.3 s instead of 21.9 s and
18.9 s, 3.29-3.54 GB instead of 2.61 GB).
The cost is that memory a command has freed stays mapped until it exits, which suits a
one-shot command. The
library never calls this (it would change the allocator of the user's process); the
console script and the benchmarks do. ``REPFUSE_SYSTEM_MALLOC=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1   # glibc malloc.h: keep this much free memory at the heap top
_M_MMAP_MAX = -4         # glibc malloc.h: how many chunks may be served by mmap (0: none)


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and never trim it; returns whether
    the setting took effect (False off glibc, or with ``REPFUSE_SYSTEM_MALLOC=1``)."""
    if not sys.platform.startswith("linux") or os.environ.get("REPFUSE_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))
