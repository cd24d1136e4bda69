"""A llama.cpp language model and its vocabulary, on the `llama_cpp` low-level bindings of
llama-cpp-python: load (llama_load.py), tokenize with special tokens parsed, turn tokens back into
UTF-8 bytes, and the model's shape (context length, KV cache per position). Contexts, batches and
decoding are in llama_context.py, sampling in sampler.py."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp as ll

from .llama_backend import LlamaError, init_backend, release
from .llama_load import default_gpu_layers, load_model
from .model_file import ModelFile
from .weight_buffers import BufferPlan


@dataclass(frozen=True)
class KVShape:
    """What one KV cache position holds: in each of n_layer layers, n_head_kv heads of K and of V."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int


class LlamaModel:
    """A loaded GGUF language model and its vocabulary."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_gpu_layers: int | None = None,
        vocab_only: bool = False,
        verbose: bool | str = False,
        buffers: BufferPlan | None = None,
        read_file: bool | None = None,
    ):
        init_backend(verbose)
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaError(f"{self.path}: no such model file")
        self.file = ModelFile(self.path)  # read through this descriptor for the model's lifetime
        n_gpu = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        try:
            self.model, self.buffers = load_model(
                self.file, n_gpu_layers=n_gpu, vocab_only=vocab_only, buffers=buffers, read_file=read_file
            )
        except BaseException:
            self.file.close()
            raise
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        # n_embd_inp is the width of input embedding rows; 0 for vocab-only loads (docs/pitfalls.md §4)
        self.n_embd = ll.llama_model_n_embd_inp(self.model) or ll.llama_model_n_embd(self.model)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def close(self) -> None:
        release(self, "model", ll.llama_model_free)
        if getattr(self, "file", None) is not None:
            self.file.close()

    def __del__(self):
        self.close()

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with (`<arch>.context_length`)."""
        return ll.llama_model_n_ctx_train(self.model)

    def kv_shape(self) -> KVShape:
        """The KV cache's shape per position (head sizes from `<arch>.attention.key_length` /
        `value_length`, which default to n_embd / n_head as in llama.cpp)."""
        arch = self.meta(gguf.Keys.General.ARCHITECTURE) or ""
        n_head = ll.llama_model_n_head(self.model)
        head = ll.llama_model_n_embd(self.model) // n_head if n_head else 0
        dim = lambda key: int(self.meta(key.format(arch=arch)) or head)  # noqa: E731
        return KVShape(
            ll.llama_model_n_layer(self.model),
            ll.llama_model_n_head_kv(self.model),
            dim(gguf.Keys.Attention.KEY_LENGTH),
            dim(gguf.Keys.Attention.VALUE_LENGTH),
        )

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            raise LlamaError(f"llama_tokenize failed ({n})")
        return arr[:n]

    def token_id(self, text: str) -> int | None:
        """Id of `text` if it is exactly one token (special tokens parsed), else None."""
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def piece(self, token: int) -> bytes:
        """Raw bytes of one token (special tokens rendered as their text, like the reference's
        decode without skip_special_tokens). Cached: the decode loop calls this per token."""
        p = self._pieces.get(token)
        if p is None:
            buf = self._piece_buf
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            p = buf.raw[:n]
            self._pieces[token] = p
        return p

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))
