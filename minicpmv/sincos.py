"""The reference resampler's sin-cos position encodings (docs/reference-model.md §3.2-§3.3), numpy float32.

The converter writes the 2-D table into the mmproj (`resampler.pos_embed_k`, required by clip.cpp);
the runtime builds the rows of each slice (and the temporal rows of video groups) from the same
functions. Every value is bit-identical to the reference's numpy code (same float32 operations).
"""

from __future__ import annotations

import functools

import numpy as np


def sincos(pos: np.ndarray, dim: int) -> np.ndarray:
    """[..., dim]: all sines then all cosines of pos * omega_k, omega_k = 1/10000^(k/(dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega
    out = np.asarray(pos, dtype=np.float32)[..., None] * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


@functools.lru_cache(maxsize=8)
def _table(n: int, dim: int) -> np.ndarray:
    """sincos of positions 0..n-1 (row p does not depend on n, so one table serves all sides <= n)."""
    t = sincos(np.arange(n, dtype=np.float32), dim)
    t.flags.writeable = False
    return t


def sincos_axes(dim: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of the 2-D table's channels: ([rows, dim/2] row encodings, [cols, dim/2]
    column encodings). Read-only views of a cached table."""
    enc = _table(1 << max(rows, cols, 64).bit_length(), dim // 2)
    return enc[:rows], enc[:cols]


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols, dim] table: the first dim/2 channels encode the COLUMN, the last dim/2 the ROW."""
    half = dim // 2
    row_enc, col_enc = sincos_axes(dim, rows, cols)
    col = np.broadcast_to(col_enc[None], (rows, cols, half))
    row = np.broadcast_to(row_enc[:, None], (rows, cols, half))
    return np.concatenate([col, row], axis=-1)
