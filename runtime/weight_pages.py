"""Load the language model with its file mapped, keeping resident only the weights used in place.

On the CPU llama.cpp copies most weights of a Q4_K_M model into its CPU_REPACK buffers
(runtime/weight_buffers.py) and uses the others (Q6_K tensors, norms, the token embedding table) where they
lie. Its two load modes each keep too much resident (docs/llamacpp.md §7.1):
- mapped (llama.cpp's default): the whole file is faulted in (MAP_POPULATE), and the pages of the
  tensors it copied stay resident next to their copies: 8.3 GB for the 8B Q4_K_M model;
- read: every tensor is read into memory, the 0.35 GB token embedding table included, of which a
  prompt reads a few dozen rows (the runtime feeds image placeholders as embedding rows, and
  generation reads one row per token).

Here the file is mapped and, from llama.cpp's progress callback (called before each tensor is
loaded), the pages of the tensors that are copied, and of the token embedding table, are dropped from
this process (madvise MADV_DONTNEED: a read-only shared file mapping is re-read from the page cache on
the next touch, nothing is lost). What stays resident: the copies, and the in-place tensors; a row of
the embedding table comes back when a token reads it. Linux only (it reads /proc/self/maps); the
caller falls back to reading the file elsewhere.

The mapping is also marked MADV_NOHUGEPAGE. The page cache holds a file in folios of up to 2 MB, and
the kernel maps a whole folio at once where it can (FilePmdMapped in /proc/self/smaps): the first
touch of a small tensor used in place (a norm) then maps the 2 MB around it, pages of its copied
neighbours included (docs/llamacpp.md §7.1 has the measurement). The 2 MB mappings already made
stay: the mark only changes later faults.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

from minicpmv.schema import TOKEN_EMBD

from .model_file import ModelFile
from .weight_buffers import WeightBuffers, repack_tensors_in

DROP_EVERY = 64 << 20  # bytes loaded between two drops: the pages copied since stay resident meanwhile


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/maps") and hasattr(mmap, "MADV_DONTNEED")


def _identity(target: str | os.PathLike | ModelFile) -> tuple[int, int, int]:
    """(device major, device minor, inode) of a file, as /proc/self/maps names a mapping's file."""
    if isinstance(target, ModelFile):
        dev, ino = target.identity
    else:
        st = os.stat(target)
        dev, ino = st.st_dev, st.st_ino
    return os.major(dev), os.minor(dev), ino


def file_mappings(target: str | os.PathLike | ModelFile) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset at start) of this process's shared mappings of a file,
    matched by device and inode (a file replaced on disk since it was mapped is still found).
    Private mappings are left out: MADV_DONTNEED on one discards its copy-on-write pages, which
    would lose data. (llama.cpp unmaps the head and tail of its mapping that no in-place tensor
    uses, at the end of the load.)"""
    major, minor, ino = _identity(target)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
            if len(parts) < 5 or int(parts[4]) != ino or parts[1][3:4] != "s":
                continue
            maj, mnr = (int(x, 16) for x in parts[3].split(":"))
            if (maj, mnr) == (major, minor):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                out.append((a, b, int(parts[2], 16)))
    return out


def drop_ranges(file: ModelFile, copied: set[str]) -> list[tuple[int, int]]:
    """File byte ranges whose pages need not stay mapped: runs of consecutive tensors (in file order)
    that are in `copied` or are the token embedding table, rounded inwards to whole pages, so a page
    that also holds a tensor used in place is kept."""
    page = os.sysconf("SC_PAGE_SIZE")
    runs: list[list[int]] = []
    extend = False
    for t in sorted(file.info.tensors.values(), key=lambda t: t.offset):
        drop = t.name in copied or t.name == TOKEN_EMBD
        if drop and extend:
            runs[-1][1] = t.offset + t.nbytes
        elif drop:
            runs.append([t.offset, t.offset + t.nbytes])
        extend = drop
    out = []
    for a, b in runs:
        a, b = -(-a // page) * page, b // page * page
        if b > a:
            out.append((a, b))
    return out


def copied_tensors(path: str | os.PathLike, wb: WeightBuffers) -> set[str]:
    """The tensors llama.cpp copies out of the mapping on this machine: those given to CPU_REPACK
    (by name in "repack" mode; in "llama" mode llama.cpp's own choice, which
    weight_buffers.repack_tensors mirrors; none in "none" mode). A wrong guess costs memory or a
    page fault, never a wrong value."""
    if wb.plan.mode == "repack":
        return set(wb.repacked)
    if wb.plan.mode == "none":
        return set()
    return set(repack_tensors_in(path))


class PageDropper:
    """llama.cpp's `progress_callback` for one mapped load: drops the pages of the `copied` tensors
    (and of token_embd) in every shared mapping of the file, at the start and then every DROP_EVERY
    bytes loaded."""

    def __init__(self, file: ModelFile, copied: set[str]):
        self.file, self.ranges = file, drop_ranges(file, copied)
        self.total = sum(t.nbytes for t in file.info.tensors.values())
        self.last = -DROP_EVERY
        libc = ctypes.CDLL(None, use_errno=True)
        self._madvise = libc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._madvise.restype = ctypes.c_int
        import llama_cpp as ll

        # kept on self: llama.cpp calls it for the whole load
        self.callback = ll.llama_progress_callback(self._progress)

    def _progress(self, frac: float, _user_data) -> bool:
        done = frac * self.total
        if frac >= 1.0 or done - self.last >= DROP_EVERY:
            self.last = done
            self.drop()
        return True

    def drop(self) -> None:
        for start, end, off in file_mappings(self.file):
            # may fail (EINVAL) on a kernel built without huge pages, which maps 4 kB pages anyway
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                self._madvise(start, end - start, mmap.MADV_NOHUGEPAGE)
            for a, b in self.ranges:  # the part of file range [a, b) this mapping holds
                lo, hi = max(a, off), min(b, off + end - start)
                if hi > lo:
                    self._madvise(start + lo - off, hi - lo, mmap.MADV_DONTNEED)
