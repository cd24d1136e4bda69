"""A GGUF file opened once: every read after the load goes through the descriptor opened at load.

`minicpm-convert --force` into the folder a running model came from replaces its files (os.replace
puts a new inode under the old name). llama.cpp keeps its mapping of the inode it opened, but the
reads this runtime makes later (token-embedding rows, the mmproj's streamed weights) would follow the
name to the new file, at the old offsets and types: silently wrong numbers. So the file is opened
once, and llama.cpp and gguf-py are handed a path to that same open file (/proc/self/fd/N on Linux,
/dev/fd/N on macOS), so every reader sees one inode for as long as the model lives.
"""

from __future__ import annotations

import os
import stat
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np

from minicpmv.gguf_info import GGUFFormatError, GGUFInfo, read_gguf_info


def _fd_path(fd: int) -> Path | None:
    for base in ("/proc/self/fd", "/dev/fd"):
        p = Path(base) / str(fd)
        if os.path.exists(p):
            return p
    return None


class ModelFile:
    """An open GGUF file: `path` is the name it was opened by (for messages), `open_path` a name of
    the open file itself for libraries that take a path, `pread` and `rows` read through the
    descriptor. OSError when the file cannot be opened; IsADirectoryError for a folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            self.close()
            raise IsADirectoryError(f"{self.path}: a folder, not a GGUF file")
        self.size = st.st_size
        self.identity = (st.st_dev, st.st_ino)  # what /proc/self/maps shows for a mapping of it
        self.open_path = _fd_path(self.fd) or self.path

    @cached_property
    def info(self) -> GGUFInfo:
        """The checked header (minicpmv.gguf_info; GGUFFormatError for a malformed file, naming
        the file by the name it was opened by)."""
        try:
            return read_gguf_info(self.open_path)
        except GGUFFormatError as e:
            raise GGUFFormatError(self.path, e.reason) from None

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly n bytes at `offset` (OSError if the file ends before)."""
        if self.fd is None:
            raise OSError(f"{self.path}: closed")
        parts, got = [], 0
        while got < n:
            b = os.pread(self.fd, n - got, offset + got)
            if not b:
                raise OSError(f"{self.path}: file ends at {offset + got}, {n - got} more bytes expected")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def rows(self, name: str, ids: list[int]) -> np.ndarray:
        """Rows `ids` of 2-D tensor `name`, dequantized to float32 [len(ids), row length] (gguf-py's
        dequantizer; NotImplementedError for a type it lacks)."""
        t = self.info.tensors[name]
        out = np.empty((len(ids), t.shape[0]), dtype=np.float32)
        for k, i in enumerate(ids):
            if not 0 <= i < t.n_rows:
                raise GGUFFormatError(self.path, f"row {i} of {name} is out of range ({t.n_rows} rows)")
            raw = np.frombuffer(self.pread(t.row_bytes, t.offset + i * t.row_bytes), dtype=np.uint8)
            out[k] = gguf.quants.dequantize(raw, t.ggml_type).reshape(-1)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()
