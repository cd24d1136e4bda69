"""Encode a float32 tensor into GGUF tensor bytes of a given GGML type (one row per output row)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from minicpmv.convert.checkpoint import f32_to_bf16_bits


def encode(x: np.ndarray, t: Q, imatrix: np.ndarray | None = None, n_threads: int | None = None) -> np.ndarray:
    """float32 array -> uint8 array [n_rows, row_bytes] in GGML type `t`."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1] if x.ndim else 1)
    if t == Q.F32:
        out = x
    elif t == Q.F16:
        out = x.astype(np.float16)
    elif t == Q.BF16:
        out = f32_to_bf16_bits(x)
    elif t in (Q.Q8_0, Q.Q4_0):
        out = quants.quantize(x, t)
    else:
        raise NotImplementedError(f"GGML type {t.name} is not supported by this encoder")
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[0], -1)
