"""Keep freed host memory in the process on CPU runs, so that each training step reuses mapped pages.

glibc gives every freed block of more than 32 MiB straight back to the kernel and serves the next request with
fresh pages the kernel must zero on first touch, while a CPU training step frees and re-allocates its
activations and logits each time: thousands of page faults per step. Serving every block from the heap and never
trimming it keeps those pages mapped, at the price of the heap's fragmentation
(docs/design.md#cpu-runs-keep-their-freed-memory).
GPU runs keep glibc's defaults: their host memory peaks once (loading a checkpoint) and should go back.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>: free memory at the heap's top above this goes back; -1: never
M_MMAP_MAX = -4  # how many blocks may be separate mappings at once; 0: all come from the heap


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it; whether the C library took it (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent from musl and other C libraries
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
