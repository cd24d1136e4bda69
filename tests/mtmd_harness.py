"""ctypes helpers around llama.cpp's mtmd (`llama_cpp.mtmd_cpp`): the oracle for our mmproj files.

    with Mtmd(mmproj_path, lm_path) as mt:
        chunks = mt.tokenize(rgb_uint8_hxwx3)          # [Chunk(kind, tokens, n_tokens), ...]
        embs = mt.encode_image(rgb_uint8_hxwx3)       # one [64, n_embd] array per image chunk

Recipe of docs/llamacpp.md §6.8: a vocab-only language model is enough to tokenize and
encode (the vision graph never touches the LM weights). `mtmd_plan` re-states mtmd's slicing rules
(docs/llamacpp.md §4.2) so tests can choose images whose preprocessing needs no resampling.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

import llama_cpp
import llama_cpp.mtmd_cpp as M

from minicpmv.runtime.llama import LlamaError, load_model

TEXT, IMAGE = 0, 1  # mtmd_input_chunk_type

_LOG: list[str] = []


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, user_data) -> None:  # keep llama.cpp quiet, remember the tail
    _LOG.append(text.decode("utf-8", "replace"))
    del _LOG[:-200]


def _quiet() -> None:
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    M.mtmd_helper_log_set(_log, ctypes.c_void_p(0))


def last_log(n: int = 20) -> str:
    return "".join(_LOG[-n:])


@dataclass
class Chunk:
    kind: int                       # TEXT or IMAGE
    n_tokens: int
    tokens: list[int] | None        # text chunks only
    nx: int = 0                     # image chunks: token grid reported by mtmd
    ny: int = 0


class Mtmd:
    """A text model (vocab only unless `vocab_only=False`) + an mtmd context for one mmproj."""

    def __init__(self, mmproj: Path, lm: Path, *, vocab_only: bool = True, n_threads: int = 1):
        _quiet()
        llama_cpp.llama_backend_init()
        try:
            self.model, _ = load_model(lm, vocab_only=vocab_only, read_file=False)
        except LlamaError:
            raise RuntimeError(f"llama.cpp could not load {lm}:\n{last_log()}") from None
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        p = M.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.warmup = False
        p.print_timings = False
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = M.mtmd_init_from_file(str(mmproj).encode(), self.model, p)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"mtmd could not load {mmproj}:\n{last_log()}")
        # vocab_only models report n_embd_inp 0 (docs/pitfalls.md §4): take the width from the mmproj itself
        r = gguf.GGUFReader(str(mmproj))
        proj = next(t for t in r.tensors if t.name == "resampler.proj.weight")
        self.n_embd = int(proj.shape[1])

    def close(self) -> None:
        if self.ctx:
            M.mtmd_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Mtmd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokenization --------------------------------------------------------------------------

    def _chunks(self, image: np.ndarray, prompt: str | None):
        img = np.ascontiguousarray(image, dtype=np.uint8)
        assert img.ndim == 3 and img.shape[2] == 3, "RGB uint8 [H, W, 3]"
        h, w = img.shape[:2]
        bmp = M.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        text = (prompt if prompt is not None else M.mtmd_default_marker().decode()).encode()
        txt = M.mtmd_input_text(text, len(text), False, True)
        chunks = M.mtmd_input_chunks_init()
        rc = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(txt), (M.mtmd_bitmap_p_ctypes * 1)(bmp), 1)
        M.mtmd_bitmap_free(bmp)
        if rc != 0:
            M.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize returned {rc}:\n{last_log()}")
        return chunks

    def tokenize(self, image: np.ndarray, prompt: str | None = None) -> list[Chunk]:
        """Chunks of `prompt` (default: just the media marker) with one image."""
        chunks = self._chunks(image, prompt)
        try:
            return [self._describe(M.mtmd_input_chunks_get(chunks, i)) for i in range(M.mtmd_input_chunks_size(chunks))]
        finally:
            M.mtmd_input_chunks_free(chunks)

    def _describe(self, ch) -> Chunk:
        kind = M.mtmd_input_chunk_get_type(ch)
        n = M.mtmd_input_chunk_get_n_tokens(ch)
        if kind == TEXT:
            cnt = ctypes.c_size_t(0)
            toks = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(cnt))
            return Chunk(kind, n, [toks[i] for i in range(cnt.value)])
        it = M.mtmd_input_chunk_get_tokens_image(ch)
        return Chunk(kind, n, None, M.mtmd_image_tokens_get_nx(it), M.mtmd_image_tokens_get_ny(it))

    def encode_image(self, image: np.ndarray) -> list[np.ndarray]:
        """[n_tokens, n_embd] float32 embeddings of every image chunk, in order (overview, slices)."""
        chunks = self._chunks(image, None)
        out = []
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                ch = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(ch) != IMAGE:
                    continue
                if M.mtmd_encode_chunk(self.ctx, ch) != 0:
                    raise RuntimeError(f"mtmd_encode_chunk failed:\n{last_log()}")
                n = M.mtmd_input_chunk_get_n_tokens(ch)
                ptr = M.mtmd_get_output_embd(self.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
        finally:
            M.mtmd_input_chunks_free(chunks)
        return out

    def encode_exact(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of one slice given exactly: mtmd feeds an image with both sides <= slice size
        through unsliced after a resize to slice x slice, which is the identity for a 448x448 input."""
        assert pixels.shape[:2] == (448, 448), "only a 448x448 image reaches the encoder unresampled"
        (emb,) = self.encode_image(pixels)
        return emb

    # -- vocabulary ----------------------------------------------------------------------------

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n].decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------
# mtmd's llava-uhd slicing rules (docs/llamacpp.md §4.2), to pick test images

@dataclass(frozen=True)
class SlicePlan:
    overview: tuple[int, int]              # (w, h)
    grid: tuple[int, int]                  # (cols, rows); (0, 0) = no slices
    refined: tuple[int, int] | None        # (w, h) of the image the slices are cut from
    slice: tuple[int, int] | None          # (w, h) of each slice


def _round_half_away(x: float) -> int:
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def _ensure_divide(n: int, p: int) -> int:
    return max(_round_half_away(n / p) * p, p)


def _best_resize(w: int, h: int, size: int, patch: int, upscale: bool) -> tuple[int, int]:
    if w * h > size * size or upscale:
        r = w / h
        h = int(size / math.sqrt(r))
        w = int(h * r)
    return _ensure_divide(w, patch), _ensure_divide(h, patch)


def mtmd_plan(w: int, h: int, size: int = 448, patch: int = 14, max_slices: int = 9) -> SlicePlan:
    if w <= size and h <= size:
        return SlicePlan((size, size), (0, 0), None, None)
    overview = _best_resize(w, h, size, patch, False)
    log_ratio = math.log(w / h)
    multiple = min(math.ceil(w * h / (size * size)), max_slices)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - math.log(m / (n // m)))
                if err < best_err:
                    best, best_err = (m, n // m), err
    gx, gy = best
    cw, ch = _ensure_divide(w, gx) // gx, _ensure_divide(h, gy) // gy
    bw, bh = _best_resize(cw, ch, size, patch, True)
    return SlicePlan(overview, (gx, gy), (bw * gx, bh * gy), (bw, bh))


def mtmd_preprocess(image: np.ndarray) -> list[np.ndarray]:
    """The uint8 images mtmd feeds its encoder for `image` [H, W, 3], in chunk order (overview,
    then slices row-major), redone with PIL: the overview is stretched (bicubic), the refined image
    is resized keeping its aspect (ceil) and centred on a black canvas (PAD_CEIL), then cropped.
    mtmd's resampler is a port of Pillow's, so the pixels agree with PIL's BICUBIC."""
    from PIL import Image

    h, w = image.shape[:2]
    plan = mtmd_plan(w, h)
    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))

    def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
        return im if im.size == size else im.resize(size, Image.BICUBIC)

    out = [np.asarray(resize(src, plan.overview))]
    if plan.grid == (0, 0):
        return out
    tw, th = plan.refined
    if (tw, th) == (w, h):
        refined = src
    else:  # float32 scale and ceil as mtmd's img_tool::resize
        scale = min(np.float32(tw) / np.float32(w), np.float32(th) / np.float32(h))
        nw = min(int(np.ceil(np.float32(w) * scale)), tw)
        nh = min(int(np.ceil(np.float32(h) * scale)), th)
        refined = Image.new("RGB", (tw, th), (0, 0, 0))
        refined.paste(resize(src, (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    arr = np.asarray(refined)
    sw, sh = plan.slice
    for r in range(plan.grid[1]):
        for c in range(plan.grid[0]):
            out.append(arr[r * sh:(r + 1) * sh, c * sw:(c + 1) * sw])
    return out
