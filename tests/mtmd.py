"""llama.cpp's own multimodal pipeline (mtmd) on our GGUF files: the reference point of the tests and
the benchmarks. The runtime itself never uses it (it runs the vision encoder in torch, vision.py).

    lm = LlamaModel(lm_path, vocab_only=True)       # enough to tokenize and encode (docs/llamacpp.md §6.8)
    with Mtmd(mmproj_path, lm) as mt, mt.tokenize([rgb_uint8]) as chunks:
        [c.kind for c in chunks]                     # TEXT / IMAGE chunks, with their tokens
        embs = chunks.embeddings()                   # [n_tokens, n_embd] per image chunk
    n_past = chunks.eval(ctx)                        # with a full model: encode + decode into ctx

Built on llama.py: an mtmd context belongs to a `LlamaModel`, chunks are evaluated into a
`LlamaContext`, and mtmd's log goes through the same callback (`recent_log()` after a failure).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import llama_cpp as ll
import llama_cpp.mtmd_cpp as M
import numpy as np

from minicpmv.gguf_info import read_gguf_info
from minicpmv.runtime.llama import LlamaModel
from minicpmv.runtime.llama_backend import LlamaError, log_callback, recent_log, release
from minicpmv.runtime.llama_context import LlamaContext
from minicpmv.schema import R_PROJ

TEXT, IMAGE = 0, 1  # enum mtmd_input_chunk_type


def marker() -> str:
    """The text that stands for one image in an mtmd prompt."""
    return M.mtmd_default_marker().decode()


@dataclass
class Chunk:
    kind: int  # TEXT or IMAGE
    n_tokens: int
    tokens: list[int] | None  # text chunks only
    nx: int = 0  # image chunks: token grid reported by mtmd
    ny: int = 0


class Mtmd:
    """An mtmd context for one mmproj next to a loaded language model (vocab-only is enough unless
    chunks are evaluated into a context). `flash_attn` None keeps mtmd's default."""

    def __init__(
        self,
        mmproj: str | os.PathLike,
        lm: LlamaModel,
        *,
        n_threads: int = 1,
        warmup: bool = False,
        flash_attn: bool | None = None,
    ):
        M.mtmd_helper_log_set(log_callback, ctypes.c_void_p(0))
        self.lm = lm
        p = M.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.warmup = warmup
        p.print_timings = False
        if flash_attn is not None:
            p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = M.mtmd_init_from_file(str(mmproj).encode(), lm.model, p)
        if not self.ctx:
            raise LlamaError(f"mtmd could not load {mmproj}: {recent_log(1).strip()}")
        # vocab-only models report an input width of 0 (docs/pitfalls.md §4): take it from the mmproj
        self.n_embd = int(read_gguf_info(mmproj).tensors[R_PROJ + ".weight"].shape[1])

    @classmethod
    def open(
        cls,
        mmproj: str | os.PathLike,
        lm_path: str | os.PathLike,
        *,
        vocab_only: bool = True,
        n_threads: int = 1,
        flash_attn: bool | None = False,
    ) -> "Mtmd":
        """An mtmd context with its own language model (mapped, as llama.cpp's tools load it), freed
        by `close`. Flash attention off by default: the oracle's vision path stays in float32."""
        lm = LlamaModel(lm_path, vocab_only=vocab_only, read_file=False)
        try:
            mt = cls(mmproj, lm, n_threads=n_threads, flash_attn=flash_attn)
        except BaseException:
            lm.close()
            raise
        mt._owns_lm = True
        return mt

    def close(self) -> None:
        release(self, "ctx", M.mtmd_free)
        if getattr(self, "_owns_lm", False):
            self.lm.close()

    def __enter__(self) -> "Mtmd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, images: list[np.ndarray], prompt: str | None = None) -> "Chunks":
        """Chunks of `prompt` (default: one marker per image) with RGB uint8 [H, W, 3] images."""
        arrays = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
        for a in arrays:
            if a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"images must be RGB uint8 [H, W, 3] arrays, got shape {a.shape}")
        bmps = [
            M.mtmd_bitmap_init(a.shape[1], a.shape[0], a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))) for a in arrays
        ]
        text = (prompt if prompt is not None else marker() * len(arrays)).encode()
        txt = M.mtmd_input_text(text, len(text), False, True)
        handle = M.mtmd_input_chunks_init()
        rc = M.mtmd_tokenize(
            self.ctx, handle, ctypes.byref(txt), (M.mtmd_bitmap_p_ctypes * len(bmps))(*bmps), len(bmps)
        )
        for b in bmps:
            M.mtmd_bitmap_free(b)
        if rc != 0:
            M.mtmd_input_chunks_free(handle)
            raise LlamaError(f"mtmd_tokenize returned {rc}: {recent_log(1).strip()}")
        return Chunks(self, handle)

    def encode_image(self, image: np.ndarray) -> list[np.ndarray]:
        """[n_tokens, n_embd] float32 embeddings of every image chunk of one image (overview, slices)."""
        with self.tokenize([image]) as chunks:
            return chunks.embeddings()


class Chunks:
    """One tokenized prompt: `Chunk` descriptions on iteration, plus encode / decode / eval."""

    def __init__(self, mtmd: Mtmd, handle):
        self.mtmd, self.handle = mtmd, handle
        self.info = [self._describe(i) for i in range(M.mtmd_input_chunks_size(handle))]

    def __iter__(self):
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def free(self) -> None:
        release(self, "handle", M.mtmd_input_chunks_free)

    def __enter__(self) -> "Chunks":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    @property
    def n_tokens(self) -> int:
        """Language-model positions of the whole prompt."""
        return int(M.mtmd_helper_get_n_tokens(self.handle))

    def _chunk(self, i: int):
        return M.mtmd_input_chunks_get(self.handle, i)

    def _describe(self, i: int) -> Chunk:
        ch = self._chunk(i)
        kind, n = M.mtmd_input_chunk_get_type(ch), M.mtmd_input_chunk_get_n_tokens(ch)
        if kind == TEXT:
            cnt = ctypes.c_size_t(0)
            toks = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(cnt))
            return Chunk(kind, n, [toks[j] for j in range(cnt.value)])
        it = M.mtmd_input_chunk_get_tokens_image(ch)
        return Chunk(kind, n, None, M.mtmd_image_tokens_get_nx(it), M.mtmd_image_tokens_get_ny(it))

    def encode(self, i: int) -> None:
        """Run the vision encoder on image chunk i (its output stays in the mtmd context)."""
        if M.mtmd_encode_chunk(self.mtmd.ctx, self._chunk(i)) != 0:
            raise LlamaError(f"mtmd_encode_chunk failed: {recent_log(1).strip()}")

    def encode_images(self) -> int:
        """Encode every image chunk (the vision part only); returns how many."""
        images = [i for i, c in enumerate(self.info) if c.kind == IMAGE]
        for i in images:
            self.encode(i)
        return len(images)

    def embeddings(self) -> list[np.ndarray]:
        """Encode every image chunk and copy out its [n_tokens, n_embd] float32 embeddings."""
        out = []
        for i, c in enumerate(self.info):
            if c.kind == IMAGE:
                self.encode(i)
                ptr = M.mtmd_get_output_embd(self.mtmd.ctx)
                n_embd = self.mtmd.n_embd
                out.append(np.ctypeslib.as_array(ptr, shape=(c.n_tokens * n_embd,)).reshape(c.n_tokens, n_embd).copy())
        return out

    def eval(self, ctx: LlamaContext, n_past: int = 0, *, logits_last: bool = True) -> int:
        """llama.cpp's pipeline (mtmd_helper_eval_chunks): encode and decode every chunk into `ctx`
        from position n_past; returns the next position."""
        new = ll.llama_pos(n_past)
        rc = M.mtmd_helper_eval_chunks(
            self.mtmd.ctx, ctx.ctx, self.handle, n_past, 0, ctx.n_batch, logits_last, ctypes.byref(new)
        )
        if rc != 0:
            raise LlamaError(f"mtmd_helper_eval_chunks returned {rc}: {recent_log(1).strip()}")
        return int(new.value)

    def eval_chunk(self, i: int, ctx: LlamaContext, n_past: int, *, logits_last: bool = False) -> int:
        """Decode one text chunk, or encode and decode one image chunk; returns the next position."""
        new = ll.llama_pos(n_past)  # the helper adds a text chunk's tokens to it
        rc = M.mtmd_helper_eval_chunk_single(
            self.mtmd.ctx, ctx.ctx, self._chunk(i), n_past, 0, ctx.n_batch, logits_last, ctypes.byref(new)
        )
        if rc != 0:
            raise LlamaError(f"mtmd chunk {i} failed ({rc}): {recent_log(1).strip()}")
        return int(new.value)

    def decode_encoded(self, i: int, ctx: LlamaContext, n_past: int) -> int:
        """Decode image chunk i from the encoder output `encode(i)` left (without encoding again)."""
        new = ll.llama_pos(n_past)
        rc = M.mtmd_helper_decode_image_chunk(
            self.mtmd.ctx,
            ctx.ctx,
            self._chunk(i),
            M.mtmd_get_output_embd(self.mtmd.ctx),
            n_past,
            0,
            ctx.n_batch,
            ctypes.byref(new),
            M.mtmd_helper_post_decode_callback(0),
            None,
        )
        if rc != 0:
            raise LlamaError(f"mtmd image chunk {i} failed ({rc}): {recent_log(1).strip()}")
        return int(new.value)
