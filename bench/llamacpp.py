"""The llama.cpp side of every comparison, on the runtime's own ctypes layer (minicpmv.runtime.llama
and tests.mtmd), so both sides load weights the same way (runtime/buffers.py).

- `BareLM`: a language model + context and a bare decode loop (prefill in n_batch chunks, greedy
  one-token decodes): the floor our runtime's decode is compared against.
- llama.cpp's own multimodal pipeline is `tests.mtmd.Mtmd` on a `BareLM`'s model:
  `mtmd_tokenize` + `mtmd_helper_eval_chunks` into the BareLM's context, or `Chunks.encode_images`
  for the vision part alone.
"""

from __future__ import annotations

import time

from minicpmv.runtime.llama import LlamaModel
from minicpmv.runtime.llama_context import ContextParams, LlamaContext
from minicpmv.runtime.sampler import Sampler, SamplingParams
from minicpmv.runtime.weight_buffers import BufferPlan


class BareLM:
    def __init__(
        self,
        path: str,
        *,
        n_ctx: int,
        n_threads: int,
        n_batch: int = 512,
        vocab_only: bool = False,
        buffers: BufferPlan | None = None,
    ):
        # mapped, as llama.cpp's tools load it; `buffers` forces a weight placement (default: the runtime's)
        self.lm = LlamaModel(path, vocab_only=vocab_only, read_file=False, buffers=buffers)
        self.ctx = (
            None
            if vocab_only
            else LlamaContext(self.lm, ContextParams(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads))
        )

    def tokenize(self, text: str) -> list[int]:
        return self.lm.tokenize(text)

    def clear(self) -> None:
        self.ctx.clear()

    def prefill(self, tokens: list[int], pos0: int = 0) -> int:
        """Decode `tokens` in n_batch chunks, logits for the last; returns the next position."""
        self.ctx.decode_tokens(tokens, pos0)
        return pos0 + len(tokens)

    def generate(self, pos: int, n: int, *, stop_at_eog: bool = False) -> tuple[list[int], float]:
        """Greedy: sample from the current logits, decode it, n times. Returns tokens and the time
        to the first sampled token (seconds since the call)."""
        sampler = Sampler(self.lm.n_vocab, SamplingParams(greedy=True, repetition_penalty=1.0))
        t0 = time.perf_counter()
        out: list[int] = []
        t_first = 0.0
        try:
            for k in range(n):
                tok = sampler.sample(self.ctx)
                if k == 0:
                    t_first = time.perf_counter() - t0
                out.append(tok)
                if (stop_at_eog and self.lm.is_eog(tok)) or k == n - 1:
                    break
                self.ctx.decode_one(tok, pos)
                pos += 1
        finally:
            sampler.close()
        return out, t_first

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self.lm.close()
