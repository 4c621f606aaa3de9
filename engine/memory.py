"""Host-memory tuning for CPU serving.

glibc raises its mmap threshold dynamically after large frees, so the large, short-lived buffers of
a forward pass (activations, logits) end up in the heap and are not returned: RSS creeps up by the
size of the biggest step. A fixed 1 MiB threshold sends them back to mmap, where freeing returns the
memory. Measured on SmolLM2 (fp32, 4 x 512-token prefill): peak RSS 1,155 -> 1,035 MiB.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (process-wide; idempotent). False where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
