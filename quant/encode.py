"""Encode a float32 tensor into GGUF tensor bytes of a given GGML type, with ggml's own kernels.

Rows are independent for every ggml quantizer (the importance matrix is per column), so the rows
are cut into chunks and quantized on several threads; ctypes drops the GIL during each C call.
Like llama-quantize, every chunk is checked with ggml_validate_row_data (rejects NaN/inf).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as Q

from . import ggml

MIN_CHUNK_ELEMENTS = 1 << 18   # below this a thread hand-off costs more than it saves


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def encode(x: np.ndarray, t: Q, imatrix: np.ndarray | None = None, n_threads: int | None = None,
           name: str = "") -> np.ndarray:
    """float32 array -> uint8 array [n_rows, row_bytes] in GGML type `t` (rows = all but the last axis).

    `imatrix`: llama.cpp importance weights, one per column (or one row of them per matrix of a 3-D
    tensor), as llama-quantize passes them to ggml_quantize_chunk. `name` only labels errors."""
    label = f"tensor {name}" if name else "tensor"
    t = Q(t)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = int(x.shape[-1]) if x.ndim else 1
    rows = x.reshape(-1, n_per_row)
    n_rows = rows.shape[0]
    block = ggml.blck_size(t)
    if n_per_row % block:
        raise ValueError(f"{label}: row length {n_per_row} is not a multiple of {t.name}'s block size {block}")
    row_bytes = ggml.row_size(t, n_per_row)
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    if n_rows == 0:
        return out

    rows_per_mat, imat = n_rows, None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        n_mat = imat.size // n_per_row
        if imat.size != n_mat * n_per_row or n_mat < 1 or n_rows % n_mat:
            raise ValueError(f"{label}: importance matrix has {imat.size} values, expected {n_per_row} "
                             f"per matrix for rows of {n_per_row}")
        rows_per_mat = n_rows // n_mat
    elif ggml.requires_imatrix(t):
        raise ValueError(f"{label}: GGML type {t.name} needs an importance matrix")

    # chunks of whole rows that never straddle two matrices (each has its own imatrix row)
    n_threads = max(1, n_threads or default_threads())
    per_chunk = max(1, MIN_CHUNK_ELEMENTS // n_per_row, -(-n_rows // (4 * n_threads)))
    chunks = [(r, min(r + per_chunk, (r // rows_per_mat + 1) * rows_per_mat, n_rows))
              for r in _chunk_starts(n_rows, rows_per_mat, per_chunk)]
    src, dst = rows.ctypes.data, out.ctypes.data
    imat_ptr = imat.ctypes.data if imat is not None else None

    def run(chunk: tuple[int, int]) -> bool:
        r0, r1 = chunk
        d = dst + r0 * row_bytes
        im = imat_ptr + (r0 // rows_per_mat) * n_per_row * 4 if imat_ptr is not None else None
        n = ggml.quantize_chunk(int(t), src + r0 * n_per_row * 4, d, r1 - r0, n_per_row, im)
        return n == (r1 - r0) * row_bytes and ggml.validate_row_data(int(t), d, n)

    if len(chunks) == 1 or n_threads == 1:
        ok = all(map(run, chunks))
    else:
        with ThreadPoolExecutor(min(n_threads, len(chunks))) as pool:
            ok = all(pool.map(run, chunks))
    if not ok:
        raise ValueError(f"{label}: {t.name} data failed validation (NaN or infinite values in the input?)")
    return out


def _chunk_starts(n_rows: int, rows_per_mat: int, per_chunk: int) -> list[int]:
    starts = []
    for m0 in range(0, n_rows, rows_per_mat):
        starts.extend(range(m0, m0 + rows_per_mat, per_chunk))
    return starts
