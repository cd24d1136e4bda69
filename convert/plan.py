"""A conversion plan: what one output tensor is, how to load it, and which GGML type it gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from minicpmv.gguf_info import row_size


@dataclass
class TensorPlan:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy (row-major) shape; ggml ne is reversed
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`, loaded only when written
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32
    source: str = ""  # checkpoint tensor(s) it comes from, for messages
    meta: dict = field(default_factory=dict)
    # Optional: rows [start, stop) of the tensor viewed as [n_rows, row_len], as float32 or as the
    # checkpoint stores them (bf16 as uint16 bits, f16). Tensors that need no transform set it so
    # the writer can stream them in row blocks.
    load_rows: Callable[[int, int], np.ndarray] | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.row_len

    @property
    def nbytes(self) -> int:
        return self.n_rows * row_size(self.ggml_type, self.row_len)
