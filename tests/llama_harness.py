"""Minimal direct use of libllama (llama-cpp-python's ctypes bindings) as a test oracle."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp as L
import numpy as np

from minicpmv.runtime.llama import load_model

_NO_LOG = L.llama_log_callback(lambda level, text, user: None)
L.llama_log_set(_NO_LOG, ctypes.c_void_p())
L.llama_backend_init()


class LlamaModel:
    """A loaded GGUF with one context; logits of every position of a token prompt."""

    def __init__(self, path: Path, n_ctx: int = 512, vocab_only: bool = False, n_threads: int = 2):
        self.model, _ = load_model(path, vocab_only=vocab_only, read_file=False)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        if not vocab_only:
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx
            cp.n_batch = n_ctx
            cp.n_ubatch = n_ctx
            cp.n_threads = cp.n_threads_batch = n_threads
            self.ctx = L.llama_init_from_model(self.model, cp)

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        b = text.encode("utf-8")
        buf = (L.llama_token * (len(b) + 16))()
        n = L.llama_tokenize(self.vocab, b, len(b), buf, len(buf), False, parse_special)
        assert n >= 0
        return list(buf[:n])

    def logits(self, tokens: list[int]) -> np.ndarray:
        """[n_tokens, n_vocab] logits of a fresh decode of `tokens`."""
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            assert L.llama_decode(self.ctx, batch) == 0
            ptr = L.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()
        finally:
            L.llama_batch_free(batch)

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        out = list(tokens)
        for _ in range(n_new):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(tokens):]

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def close(self) -> None:
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
