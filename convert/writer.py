"""Streaming GGUF writer: header and tensor infos first, then tensor data one tensor at a time.

Memory stays bounded by the largest tensor (plus the one being prepared in the background): each
tensor is loaded from the memory-mapped checkpoint, encoded, written and dropped. The file is
written under a temporary name and renamed at the end, so a failure never leaves a half file.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf import GGUFWriter

from .plan import TensorPlan

Encoder = Callable[[np.ndarray, TensorPlan], np.ndarray]  # f32 tensor -> uint8 [n_rows, row_bytes]


class OutputExistsError(FileExistsError):
    pass


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: output exists (use --force to overwrite)")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_gguf(path: Path, arch: str, add_metadata: Callable[[GGUFWriter], None],
               plans: list[TensorPlan], encode: Encoder, *, force: bool = False,
               on_tensor: Callable[[TensorPlan], None] | None = None) -> Path:
    """Write `plans` to `path` (atomic). `on_tensor` is called after each tensor (progress)."""
    path = Path(path)
    check_output(path, force)
    tmp = temp_path(path)
    try:
        w = GGUFWriter(tmp, arch, use_temp_file=False)
        add_metadata(w)
        for p in plans:
            w.add_tensor_info(p.name, (p.n_rows, p.nbytes // p.n_rows) if p.n_rows else (0,),
                              np.dtype(np.uint8), p.nbytes, raw_dtype=p.ggml_type)
            # GGUFWriter derived ne from the byte shape; make it the logical shape (2-D+ tensors
            # such as the 4-D patch embedding keep all their dims).
            w.tensors[-1][p.name].shape = list(p.shape)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p, data in _prefetch(plans, encode):
            if data.nbytes != p.nbytes:
                raise ValueError(f"tensor {p.name}: encoded {data.nbytes} bytes, expected {p.nbytes}")
            w.write_tensor_data(data)
            if on_tensor:
                on_tensor(p)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _prefetch(plans: list[TensorPlan], encode: Encoder) -> Iterable[tuple[TensorPlan, np.ndarray]]:
    """Load+encode the next tensor in a thread while the current one is written (I/O overlap)."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work():
        try:
            for p in plans:
                if stop.is_set():
                    return
                x = p.load()
                if tuple(x.shape) != tuple(p.shape):
                    raise ValueError(f"tensor {p.name} ({p.source}): shape {tuple(x.shape)}, expected {p.shape}")
                q.put((p, encode(x, p)))
            q.put(None)
        except BaseException as e:  # hand the error to the writing thread
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        t.join()
