"""The llama.cpp side of every comparison, straight on llama-cpp-python's ctypes bindings.

- `BareLM`: a language model + context and a bare `llama_decode` loop (prefill one batch,
  greedy decode one token at a time) — the floor our runtime's decode is compared against.
- `MtmdPipeline`: llama.cpp's own multimodal pipeline on the same files: `mtmd_tokenize` +
  `mtmd_helper_eval_chunks` (encodes every image chunk with clip, decodes text and embeddings),
  then the same greedy loop; and `encode_slice` (`mtmd_encode_chunk` of one 448x448 image).
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

import llama_cpp as L
import llama_cpp.mtmd_cpp as M

from minicpmv.runtime.llama import LlamaError, load_model

IMAGE_CHUNK = 1
_LOG_TAIL: list[str] = []


@L.llama_log_callback
def _log(level: int, text: bytes, user_data) -> None:
    _LOG_TAIL.append(text.decode("utf-8", "replace"))
    del _LOG_TAIL[:-50]


def quiet() -> None:
    L.llama_log_set(_log, ctypes.c_void_p(0))
    M.mtmd_helper_log_set(_log, ctypes.c_void_p(0))
    L.llama_backend_init()


def log_tail() -> str:
    return "".join(_LOG_TAIL[-10:])


class BareLM:
    def __init__(self, path: str, *, n_ctx: int, n_threads: int, n_batch: int = 512, vocab_only: bool = False):
        quiet()
        try:  # the runtime's loader: the same weight buffers (runtime/buffers.py) on both sides
            self.model, self.buffers = load_model(path, vocab_only=vocab_only, read_file=False)
        except LlamaError:
            raise RuntimeError(f"llama.cpp cannot load {path}: {log_tail()}") from None
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        if vocab_only:
            return
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(n_batch, n_ctx)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"cannot create a context (n_ctx={n_ctx}): {log_tail()}")
        self.n_batch = cp.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self.greedy = L.llama_sampler_init_greedy()

    def tokenize(self, text: str) -> list[int]:
        b = text.encode()
        buf = (L.llama_token * (len(b) + 16))()
        n = L.llama_tokenize(self.vocab, b, len(b), buf, len(buf), False, True)
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[:n])

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def prefill(self, tokens: list[int], pos0: int = 0) -> int:
        """Decode `tokens` in n_batch chunks, logits for the last; returns the next position."""
        b = self.batch
        for s in range(0, len(tokens), self.n_batch):
            part = tokens[s:s + self.n_batch]
            for i, t in enumerate(part):
                b.token[i] = t
                b.pos[i] = pos0 + s + i
                b.logits[i] = 0
            b.logits[len(part) - 1] = 1 if s + len(part) == len(tokens) else 0
            b.n_tokens = len(part)
            if L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError(f"llama_decode failed: {log_tail()}")
        return pos0 + len(tokens)

    def generate(self, pos: int, n: int, *, stop_at_eog: bool = False) -> tuple[list[int], float]:
        """Greedy: sample from the current logits, decode it, n times. Returns tokens and the time
        to the first sampled token (seconds since the call)."""
        t0 = time.perf_counter()
        out: list[int] = []
        t_first = 0.0
        b = self.batch
        for k in range(n):
            tok = L.llama_sampler_sample(self.greedy, self.ctx, -1)
            if k == 0:
                t_first = time.perf_counter() - t0
            out.append(tok)
            if stop_at_eog and L.llama_vocab_is_eog(self.vocab, tok):
                break
            if k == n - 1:
                break
            b.token[0] = tok
            b.pos[0] = pos
            b.logits[0] = 1
            b.n_tokens = 1
            if L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError(f"llama_decode failed: {log_tail()}")
            pos += 1
        return out, t_first

    def close(self) -> None:
        if self.ctx:
            L.llama_sampler_free(self.greedy)
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


class MtmdPipeline:
    """mtmd on top of a BareLM (whose context is used for the pipeline)."""

    def __init__(self, lm: BareLM, mmproj: str, *, n_threads: int, warmup: bool = True):
        self.lm = lm
        p = M.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.print_timings = False
        p.warmup = warmup
        self.ctx = M.mtmd_init_from_file(str(mmproj).encode(), lm.model, p)
        if not self.ctx:
            raise RuntimeError(f"mtmd cannot load {mmproj}: {log_tail()}")

    def tokenize(self, prompt: str, images: list[np.ndarray]):
        bmps = []
        for img in images:
            img = np.ascontiguousarray(img, dtype=np.uint8)
            h, w = img.shape[:2]
            bmps.append(M.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))))
        text = prompt.encode()
        txt = M.mtmd_input_text(text, len(text), False, True)
        chunks = M.mtmd_input_chunks_init()
        arr = (M.mtmd_bitmap_p_ctypes * len(bmps))(*bmps)
        rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(txt), arr, len(bmps))
        for b in bmps:
            M.mtmd_bitmap_free(b)
        if rc != 0:
            M.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize returned {rc}: {log_tail()}")
        return chunks

    @staticmethod
    def n_tokens(chunks) -> int:
        return int(M.mtmd_helper_get_n_tokens(chunks))

    def encode_images(self, chunks) -> int:
        """mtmd_encode_chunk on every image chunk (the vision part only); returns how many."""
        n = 0
        for i in range(M.mtmd_input_chunks_size(chunks)):
            ch = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(ch) == IMAGE_CHUNK:
                if M.mtmd_encode_chunk(self.ctx, ch) != 0:
                    raise RuntimeError(f"mtmd_encode_chunk failed: {log_tail()}")
                n += 1
        return n

    def eval_chunks(self, chunks) -> int:
        """llama.cpp's own pipeline: encode + decode every chunk from position 0; returns n_past."""
        new_n_past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.ctx, self.lm.ctx, chunks, 0, 0, self.lm.n_batch, True,
                                       ctypes.byref(new_n_past))
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks returned {rc}: {log_tail()}")
        return int(new_n_past.value)

    def free_chunks(self, chunks) -> None:
        M.mtmd_input_chunks_free(chunks)

    def close(self) -> None:
        if self.ctx:
            M.mtmd_free(self.ctx)
            self.ctx = None


def marker() -> str:
    return M.mtmd_default_marker().decode()
