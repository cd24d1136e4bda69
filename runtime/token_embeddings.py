"""Rows of the language model's input embedding table (token_embd), read through the model's open
file and dequantized with gguf-py."""

from __future__ import annotations

import numpy as np

from minicpmv.gguf_info import GGUFFormatError
from minicpmv.schema import TOKEN_EMBD

from .llama_backend import LlamaError
from .model_file import ModelFile


class TokenEmbeddings:
    """Rows of the language model's input embedding table (token_embd), dequantized with gguf-py.

    llama.cpp cannot mix token ids and embedding rows in one batch, so an image placeholder
    ("<image>" + 64 rows + "</image>" + "<slice>" + 64 rows + ...) would take one decode call per
    text run between slots; every call reads all the weights once, which dominates for small
    batches. Turning those tokens into their embedding rows lets the whole placeholder, and the
    text right after it, go through one embedding batch. The rows are exactly what llama.cpp's
    get_rows feeds the first layer (Qwen3 does not scale input embeddings).
    """

    NAME = TOKEN_EMBD
    MAX_CACHED = 1024  # rows (16 MB at the 8B model's width 4096)

    def __init__(self, file: ModelFile, n_embd: int):
        """`file`: the language model's GGUF, opened once (model_file.py)."""
        self.file, self.n_embd = file, n_embd
        self._rows: dict[int, np.ndarray] = {}
        self._ok: bool | None = None

    @property
    def available(self) -> bool:
        """False when the table cannot be read here (then callers decode token batches)."""
        if self._ok is None:
            self._ok = False
            try:
                t = self.file.info.tensors[self.NAME]
                if t.shape[0] == self.n_embd:
                    self.file.rows(self.NAME, [0])  # is the type supported by gguf-py's dequantizer?
                    self._ok = True
            except (OSError, GGUFFormatError, KeyError, NotImplementedError):
                pass  # unreadable file, no token_embd, or a type gguf-py cannot dequantize: token batches
        return self._ok

    def rows(self, ids: list[int]) -> np.ndarray:
        """[len(ids), n_embd] float32 (cached per id: placeholders repeat a few tokens; the cache is
        emptied when it would pass MAX_CACHED rows, so long fused questions do not pile up)."""
        missing = sorted({i for i in ids if i not in self._rows})
        if missing:
            if not self.available:
                raise LlamaError(f"{self.file.path}: token embeddings cannot be read")
            if len(self._rows) + len(missing) > self.MAX_CACHED:
                self._rows.clear()
                missing = sorted(set(ids))
            for i, row in zip(missing, self.file.rows(self.NAME, missing)):
                self._rows[i] = row
        return np.stack([self._rows[i] for i in ids]) if ids else np.zeros((0, self.n_embd), np.float32)
