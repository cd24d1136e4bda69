"""Threads and memory around the vision encoder: torch's intra-op thread count for a call, and
handing freed activations back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch


class torch_threads:
    """Run with torch's intra-op thread count set to n, restoring it afterwards."""

    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.old != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old != self.n:
            torch.set_num_threads(self.old)


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


_malloc_trim = _find_malloc_trim()


def return_freed_memory() -> None:
    """Hand the activations' freed heap back to the OS (glibc keeps freed blocks in per-thread
    arenas, which the vision workers fill); a no-op where malloc_trim does not exist."""
    if _malloc_trim is not None:
        _malloc_trim(0)
