"""Keeping a long-running server's memory flat: give the C allocator's free pages back to the OS.

A serving replica allocates tensors of another size for every batch (rows x vocabulary logits, key/value caches)
and loads a new model beside the old one at each night's release. glibc keeps what is freed inside its heaps for
reuse, fragmented, so RSS climbs with the requests served and the releases loaded although nothing is held:
`trim_memory` (glibc `malloc_trim(0)`, which also returns whole free pages inside the heap) undoes that. Measured
on the tiny model (one replica, 3,064 requests, one reload): RSS 866 MB at the end without trimming, 788 MB with.

What trimming cannot return: oneDNN's primitive cache (bf16 CPU matmuls), which keeps one JIT kernel per matmul
shape (batch rows x sequence length), up to ONEDNN_PRIMITIVE_CACHE_CAPACITY kernels (oneDNN's default: 1024), so a
replica's RSS also grows with the variety of batch shapes it has seen, independently of how many users are stored.
Measured on the tiny model, 150 batches of 1-32 random rows in one process: RSS +225 MB with the default capacity,
+115 MB with 128, +97 MB with 16 (+96 MB with 0: the rest is a one-time warm-up), at the same ms per row within the
noise of this box (7.5-8.4 default, 7.7-7.8 with 128; 10.8 with 0, which recompiles every kernel). `latentpref
serve` starts its replicas with a capacity of 128 (ServeOptions.onednn_cache).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to trim this way
        return None


def trim_memory() -> bool:
    """Return the C allocator's free memory to the OS; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
