"""Encode a tensor into GGUF tensor bytes of a given GGML type, with ggml's own kernels.

Rows are independent for every ggml quantizer (the importance matrix is per column), so the rows
are cut into chunks and quantized on several threads; ctypes drops the GIL during each C call.
A 16-bit input (the raw bits of a BF16/F16 tensor, e.g. memory-mapped from the checkpoint) is widened
to float32 chunk by chunk inside the workers with ggml's converters, as llama-quantize does, so the
whole tensor never exists in float32. Like llama-quantize, every chunk is checked with
ggml_validate_row_data (rejects NaN/inf).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as Q

from minicpmv.cpu import cpu_info
from minicpmv.gguf_info import row_size

from . import ggml

MIN_CHUNK_ELEMENTS = 1 << 18  # below this a thread hand-off costs more than it saves
MAX_CHUNK_ELEMENTS = 1 << 22  # bounds the float32 scratch of a 16-bit input (16 MB per chunk)
_ITEMSIZE = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}


def encode(
    x: np.ndarray,
    t: Q,
    imatrix: np.ndarray | None = None,
    n_threads: int | None = None,
    name: str = "",
    src_type: Q | None = None,
) -> np.ndarray:
    """Tensor -> uint8 array [n_rows, row_bytes] in GGML type `t` (rows = all but the last axis).

    `x`: float32 values, or with `src_type` BF16/F16 the raw 16-bit patterns (uint16/float16 array).
    `imatrix`: llama.cpp importance weights, one per column (or one row of them per matrix of a 3-D
    tensor), as llama-quantize passes them to ggml_quantize_chunk. `name` only labels errors."""
    label = f"tensor {name}" if name else "tensor"
    t = Q(t)
    src_type = Q(src_type) if src_type is not None else (Q.F16 if x.dtype == np.float16 else Q.F32)
    if src_type not in _ITEMSIZE:
        raise ValueError(f"{label}: cannot encode from {src_type.name}")
    if src_type == Q.F32:
        x = np.ascontiguousarray(x, dtype=np.float32)
    else:
        x = np.ascontiguousarray(x)
        if x.dtype.itemsize != 2:
            raise ValueError(f"{label}: {src_type.name} input must be 16-bit patterns, got {x.dtype}")
    n_per_row = int(x.shape[-1]) if x.ndim else 1
    rows = x.reshape(-1, n_per_row)
    n_rows = rows.shape[0]
    try:
        row_bytes = row_size(t, n_per_row)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    if n_rows == 0:
        return out

    rows_per_mat, imat = n_rows, None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        n_mat = imat.size // n_per_row
        if imat.size != n_mat * n_per_row or n_mat < 1 or n_rows % n_mat:
            raise ValueError(
                f"{label}: importance matrix has {imat.size} values, expected {n_per_row} "
                f"per matrix for rows of {n_per_row}"
            )
        rows_per_mat = n_rows // n_mat
    elif ggml.requires_imatrix(t):
        raise ValueError(f"{label}: GGML type {t.name} needs an importance matrix")

    # chunks of whole rows that never straddle two matrices (each has its own imatrix row)
    n_threads = max(1, n_threads or cpu_info().logical_cpus)  # like llama-quantize: every usable CPU
    elems = min(MAX_CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, -(-rows.size // (4 * n_threads))))
    per_chunk = max(1, elems // n_per_row)
    chunks = [
        (r, min(r + per_chunk, (r // rows_per_mat + 1) * rows_per_mat, n_rows))
        for r in _chunk_starts(n_rows, rows_per_mat, per_chunk)
    ]
    src, dst, item = rows.ctypes.data, out.ctypes.data, _ITEMSIZE[src_type]
    imat_ptr = imat.ctypes.data if imat is not None else None
    same = src_type == t  # llama-quantize copies such a tensor unchanged
    if same:
        out[...] = rows.view(np.uint8).reshape(n_rows, row_bytes)

    def run(chunk: tuple[int, int]) -> bool:
        r0, r1 = chunk
        d = dst + r0 * row_bytes
        if same:
            return ggml.validate_row_data(int(t), d, (r1 - r0) * row_bytes)
        n = (r1 - r0) * n_per_row
        s = src + r0 * n_per_row * item
        if src_type != Q.F32:
            buf = np.empty(n, dtype=np.float32)
            ggml.to_f32_row(src_type.name, s, buf.ctypes.data, n)
            s = buf.ctypes.data
        im = imat_ptr + (r0 // rows_per_mat) * n_per_row * 4 if imat_ptr is not None else None
        written = ggml.quantize_chunk(int(t), s, d, r1 - r0, n_per_row, im)
        return written == (r1 - r0) * row_bytes and ggml.validate_row_data(int(t), d, written)

    if len(chunks) == 1 or n_threads == 1:
        ok = all([run(c) for c in chunks])
    else:
        with ThreadPoolExecutor(min(n_threads, len(chunks))) as pool:
            ok = all(list(pool.map(run, chunks)))
    if not ok:
        raise ValueError(f"{label}: {t.name} data failed validation (NaN or infinite values in the input?)")
    return out


def _chunk_starts(n_rows: int, rows_per_mat: int, per_chunk: int) -> list[int]:
    starts = []
    for m0 in range(0, n_rows, rows_per_mat):
        starts.extend(range(m0, m0 + rows_per_mat, per_chunk))
    return starts
