"""`MiniCPMV`: image (and video-frame) chat on llama.cpp kernels, with the reference's prompt.

    model = MiniCPMV.load("MiniCPM-V-4.5-Q4_K_M.gguf", "mmproj-MiniCPM-V-4.5-F16.gguf")
    answer = model.chat([{"role": "user", "content": [Image.open("cat.jpg"), "What is this?"]}])
    print(answer, answer.thinking, answer.stats.decode_tps)

One turn: render the whole conversation exactly as the reference `chat()` does (prompt.py), tokenize
the text pieces with llama.cpp, keep the KV cache up to the longest common prefix with what is
already decoded (token ids and image-slot identities), encode the images that are not cached yet
(vision.py, torch on the CPU), prefill from the first differing position (text as token batches,
image slots as embedding batches of 64 rows each at their positions; by default the few tokens
inside a placeholder go along as their embedding rows, so a whole image is one batch), then sample
until <|im_end|>/<|endoftext|>.

Return value: `Answer`, a `str` holding the answer with the thinking removed and stripped; its
`.thinking` is the reasoning text (empty when thinking is off), `.raw` is what the reference's
`chat()` returns ("<think>\\n" + generated text when thinking), `.stats` the turn's counters and
timings. `stream=True` returns a `ChatStream`: an iterator of `Piece` strings (each with a
`.thinking` flag); after it is exhausted `.result` holds the `Answer`. `model.last` is the last
`Answer` either way.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from minicpmv.cpu import default_threads
from minicpmv.gguf_info import ModelFileError, find_model_files, gguf_architecture
from minicpmv.schema import (MMPROJ_ARCH, MAX_SLICE_NUMS, QUERY_NUM, REFERENCE_SAMPLING, SLOT_TOKEN, STOP_TOKENS, THINK_END,
                             THINK_START, THINKING_SAMPLING, VIDEO_MAX_SLICE_NUMS)

from .image import load_image, slice_image
from .llama import (ContextOverflowError, ContextParams, LlamaContext, LlamaError, LlamaModel, Sampler,
                    SamplingParams, TokenEmbeddings)
from .prompt import Media, Prompt, PromptError, Slot, build_prompt

VISION_BATCH_SLICES = 48   # slices (frames x slots) per vision call
FUSE_MAX_TEXT = 16         # text runs up to this long next to a slot are decoded as embedding rows


# --------------------------------------------------------------------------- results

@dataclass
class ChatStats:
    """Counters and timings of one chat() turn (the tests assert on the counters)."""
    prompt_tokens: int = 0          # positions in the full prompt (text tokens + 64 per slot)
    prefill_start: int = 0          # first position decoded this turn (= reused KV length)
    tokens_prefilled: int = 0       # positions decoded during prefill (text + embedding rows)
    slots_prefilled: int = 0        # image slots decoded this turn
    prefill_batches: int = 0        # llama_decode calls of the prefill
    images_encoded: int = 0         # media items run through the vision encoder this turn
    slots_encoded: int = 0          # overview/slice outputs computed this turn
    vision_ms: list[float] = field(default_factory=list)   # per encoded slot
    prefill_ms: float = 0.0         # LM prefill (excludes vision)
    decode_tokens: int = 0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0            # start of chat() to the first sampled token
    finish_reason: str = ""         # "stop", "length" (max_new_tokens) or "context" (n_ctx full)

    @property
    def prefill_tps(self) -> float:
        return self.tokens_prefilled / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["prefill_tps"], d["decode_tps"] = self.prefill_tps, self.decode_tps
        return d


class Answer(str):
    """The answer text (thinking removed, stripped) with `.thinking`, `.raw` and `.stats`."""
    thinking: str
    raw: str
    stats: ChatStats
    tokens: list[int]

    def __new__(cls, answer: str, thinking: str, raw: str, stats: ChatStats, tokens: list[int]):
        obj = super().__new__(cls, answer)
        obj.thinking, obj.raw, obj.stats, obj.tokens = thinking, raw, stats, tokens
        return obj


class Piece(str):
    """One streamed text piece; `.thinking` is True for reasoning text."""
    thinking: bool

    def __new__(cls, text: str, thinking: bool):
        obj = super().__new__(cls, text)
        obj.thinking = thinking
        return obj


class ChatStream:
    """Iterator of `Piece`s; `.result` is the `Answer` once the iterator is exhausted."""

    def __init__(self, gen: Iterator[Piece]):
        self._gen = gen
        self.result: Answer | None = None

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> Piece:
        return next(self._gen)


# --------------------------------------------------------------------------- files

def _looks_like_file(s: str) -> bool:
    """A content string naming an existing image or video file (by its extension) is that file
    (README usage: ["photo.jpg", "What is in the image?"]); any other string is text."""
    if not s or len(s) > 4096 or "\n" in s:
        return False
    suffix = Path(s).suffix.lower()
    video = _video_module()
    known = suffix in Image.registered_extensions() or (video is not None and suffix in video.VIDEO_EXTENSIONS)
    try:
        return known and Path(s).is_file()
    except (OSError, ValueError):
        return False


def _video_module():
    """minicpmv.runtime.video, or None when video support (PyAV) is unavailable."""
    try:
        from . import video
    except ImportError:
        return None
    return video


def _image_key(img: Image.Image) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()


# --------------------------------------------------------------------------- the model

class MiniCPMV:
    """MiniCPM-V 4.5: llama.cpp language model + torch vision encoder, one conversation's KV cache."""

    def __init__(self, lm: LlamaModel, ctx: LlamaContext, vision, *, cache_bytes: int = 1 << 30,
                 fuse_placeholders: bool = True):
        self.lm, self.ctx, self.vision = lm, ctx, vision
        self.fuse_placeholders = fuse_placeholders
        self.tok_embd = TokenEmbeddings(lm.path, lm.n_embd)
        self.query_num = getattr(vision, "query_num", QUERY_NUM) if vision is not None else QUERY_NUM
        self.cache_bytes = cache_bytes
        self.progress = False  # a progress bar (stderr) while many slices/frames are encoded
        self._emb_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._videos: dict = {}
        self._kv: list = []                     # what each KV position holds (token id or slot row)
        stops = {t for t in (lm.token_id(s) for s in STOP_TOKENS) if t is not None}
        self.stop_ids = frozenset(stops)
        self.think_end_id = lm.token_id(THINK_END)
        self.last: Answer | None = None
        self.stats = ChatStats()

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None, *,
             n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int | None = None,
             vision_dtype: str = "auto", n_batch: int = 512, kv_type: str = "f16",
             flash_attn: bool | None = None, fuse_placeholders: bool = True,
             verbose: bool = False) -> "MiniCPMV":
        """Load the language model GGUF and the mmproj GGUF, or a folder holding both.

        `n_gpu_layers` None = all layers on Metal on macOS, CPU elsewhere. llama.cpp's defaults keep
        the KV cache in f16 and use flash attention (f16 math on the CPU), so logits move by ~1e-4 of
        their range with how positions were batched; `kv_type="f32", flash_attn=False` makes them
        reproducible to ~1e-7 (more memory, slower attention). `fuse_placeholders=False` decodes
        every text run as tokens and every slot as its own 64-row batch (mtmd's layout). Raises
        ModelFileError (one line) for missing/unreadable files or a mmproj whose width does not
        match the language model.
        """
        model_path = Path(model_path)
        if mmproj_path is None:
            if not model_path.is_dir():
                raise ModelFileError(f"{model_path}: give a folder holding both GGUF files, or also the mmproj path")
            model_path, mmproj_path = find_model_files(model_path)
        mmproj_path = Path(mmproj_path)
        for p, what in ((model_path, "language model"), (mmproj_path, "mmproj")):
            if not p.is_file():
                raise ModelFileError(f"{p}: {what} file not found")
        if gguf_architecture(mmproj_path) != MMPROJ_ARCH:
            raise ModelFileError(f"{mmproj_path}: not a mmproj file (general.architecture is not {MMPROJ_ARCH!r})")
        if gguf_architecture(model_path) == MMPROJ_ARCH:
            raise ModelFileError(f"{model_path}: this is a mmproj file, not the language model")

        from .vision import VisionEncoder
        threads = n_threads or default_threads()
        try:
            vision = VisionEncoder.load(mmproj_path, dtype=vision_dtype, n_threads=threads)
        except (ValueError, OSError) as e:
            raise ModelFileError(str(e).splitlines()[0] if str(e) else f"{mmproj_path}: cannot load") from None
        try:
            lm = LlamaModel(model_path, n_gpu_layers=n_gpu_layers, verbose=verbose)
        except LlamaError as e:
            raise ModelFileError(str(e)) from None
        if vision.embed_dim != lm.n_embd:
            raise ModelFileError(f"{mmproj_path}: mmproj produces {vision.embed_dim}-wide embeddings but the "
                                 f"language model {model_path.name} expects {lm.n_embd}; use the matching pair")
        ctx = LlamaContext(lm, ContextParams(n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                                             kv_type=kv_type, flash_attn=flash_attn))
        return cls(lm, ctx, vision, fuse_placeholders=fuse_placeholders)

    def close(self) -> None:
        self.ctx.close()
        self.lm.close()

    def __enter__(self) -> "MiniCPMV":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the KV cache (the image-embedding cache is kept)."""
        self.ctx.clear()
        self._kv = []

    # -- prompt --------------------------------------------------------------------------------

    def _item(self, c):
        """One content item -> str, PIL RGB image or VideoFrames (paths and dicts are loaded)."""
        if isinstance(c, dict):
            if "video" in c:
                return self._video(c["video"], **{k: c[k] for k in ("fps", "packing", "max_frames") if k in c})
            c = c.get("image", c.get("text", c))
        if isinstance(c, Image.Image):
            return load_image(c, background=None)  # the reference: a plain convert("RGB")
        if isinstance(c, str) and not _looks_like_file(c):
            return c
        if isinstance(c, (str, os.PathLike)):
            video = _video_module()
            if video is not None and video.is_video_path(c):
                return self._video(c)
            return load_image(Path(c))
        return c  # VideoFrames, or something build_prompt will reject with a clear message

    def _video(self, path, fps: float = 5, packing: int | None = None, max_frames: int = 180):
        """Decoded once per (file, size, mtime, sampling): later turns reuse the frames."""
        video = _video_module()
        if video is None:
            raise ValueError(f"{path}: video input needs PyAV (pip install av)")
        p = Path(path)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), st and st.st_size, st and st.st_mtime_ns, fps, packing, max_frames)
        v = self._videos.get(key)
        if v is None:
            v = video.load_video(p, fps=fps, packing=packing, max_frames=max_frames)
            self._videos = {key: v}  # keep the last video only (frames are large)
        return v

    def _expand(self, msgs: list[dict]) -> tuple[list[dict], list[list[int]] | None]:
        """Load every content item; videos become their frames. Returns the messages and, when a
        video is present, the temporal groups of every image in order (a still image is its own
        group [-1], i.e. no temporal term, as the reference without temporal_ids)."""
        out, groups, has_video = [], [], False
        for m in msgs:
            content = m.get("content")
            items = [content] if isinstance(content, str) else list(content or [])
            conv = []
            for c in items:
                c = self._item(c)
                if isinstance(c, Image.Image):
                    conv.append(c)
                    groups.append([-1])
                elif hasattr(c, "frames") and hasattr(c, "temporal_ids"):  # runtime.video.VideoFrames
                    conv += list(c.frames)
                    groups += [list(g) for g in c.temporal_ids]
                    has_video = True
                else:
                    conv.append(c)
            out.append({"role": m.get("role"), "content": conv})
        return out, (groups if has_video else None)

    def build_prompt(self, msgs: list[dict], *, enable_thinking: bool = False, system_prompt: str = "",
                     max_slice_nums: int | None = None, use_image_id: bool | None = None,
                     temporal_ids: list[list[int]] | None = None) -> Prompt:
        """The reference's prompt for `msgs`. Defaults: max_slice_nums 9 and use_image_id True, or
        1 and False when the conversation holds a video (the model card's video settings)."""
        msgs, video_groups = self._expand(msgs)
        if video_groups is not None:
            if temporal_ids is not None:
                raise PromptError("give videos either as video items or as frames with temporal_ids, not both")
            temporal_ids = video_groups
        video = video_groups is not None
        if max_slice_nums is None:
            max_slice_nums = VIDEO_MAX_SLICE_NUMS if video else MAX_SLICE_NUMS
        if use_image_id is None:
            use_image_id = not video
        return build_prompt(msgs, system_prompt=system_prompt, enable_thinking=enable_thinking,
                            max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                            temporal_ids=temporal_ids, query_num=self.query_num)

    def prompt_token_ids(self, prompt: Prompt, slot_id: int | None = None) -> list[int]:
        """The prompt as the reference's input ids (slots as `<unk>` unless `slot_id` is given)."""
        if slot_id is None:
            slot_id = self.lm.token_id(SLOT_TOKEN)
        return prompt.token_ids(self.lm.tokenize, slot_id, self.query_num)

    # -- vision --------------------------------------------------------------------------------

    def _media_key(self, m: Media, max_slice_nums: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{max_slice_nums}|{m.temporal_ids}|".encode())
        for f in m.frames:
            h.update(_image_key(f))
        return h.digest()

    def _encode(self, todo: list[Media], max_slice_nums: int, stats: ChatStats) -> list[np.ndarray]:
        """[n_slots, query_num, n_embd] per media item, all items in one vision call (the encoder
        batches slices up to its token budget). Slot g of a temporal group is the g-th slice of
        every frame of the group, attended jointly; a still image's slots are groups [-1] (no
        temporal term), exactly as the reference without temporal_ids."""
        pixels: list[np.ndarray] = []
        groups: list[list[int]] = []
        for m in todo:
            sliced = [slice_image(f, max_slice_nums) for f in m.frames]
            if len(sliced[0].images) != m.n_slots:
                raise AssertionError(f"slicing gave {len(sliced[0].images)} slots, the placeholder {m.n_slots}")
            per_frame = [s.pixel_values() for s in sliced]
            for g in range(m.n_slots):
                pixels += [pf[g] for pf in per_frame]
                groups.append(list(m.temporal_ids) if m.temporal_ids is not None else [-1])
        t0 = time.perf_counter()
        emb = np.asarray(self.vision.encode_slices(pixels, groups, progress=self.progress and len(groups) > 8),
                         dtype=np.float32)
        ms = (time.perf_counter() - t0) * 1e3
        stats.images_encoded += len(todo)
        stats.slots_encoded += len(groups)
        stats.vision_ms += [ms / len(groups)] * len(groups)
        out, k = [], 0
        for m in todo:
            out.append(np.ascontiguousarray(emb[k:k + m.n_slots]))
            k += m.n_slots
        return out

    def _remember(self, key: bytes, emb: np.ndarray) -> None:
        self._emb_cache[key] = emb
        total = sum(e.nbytes for e in self._emb_cache.values())
        while total > self.cache_bytes and len(self._emb_cache) > 1:
            _, old = self._emb_cache.popitem(last=False)
            total -= old.nbytes

    # -- prefill -------------------------------------------------------------------------------

    def _units(self, prompt: Prompt, max_slice_nums: int) -> tuple[list, list[tuple[int, Slot, bytes]]]:
        """Per-position keys of the prompt and (start position, slot, media key) of every slot."""
        keys: list = []
        slots = []
        mkeys = [self._media_key(m, max_slice_nums) for m in prompt.media]
        for seg in prompt.segments:
            if isinstance(seg, Slot):
                k = mkeys[seg.media]
                slots.append((len(keys), seg, k))
                keys += [(k, seg.index, r) for r in range(self.query_num)]
            else:
                keys += self.lm.tokenize(seg)
        return keys, slots

    def _prefill(self, prompt: Prompt, stats: ChatStats) -> None:
        max_slice_nums = prompt.max_slice_nums
        keys, slots = self._units(prompt, max_slice_nums)
        n = len(keys)
        stats.prompt_tokens = n
        if n + 1 > self.ctx.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n} tokens ({len(slots)} image slots x {self.query_num} + "
                f"{n - len(slots) * self.query_num} text tokens) plus room to answer, but the context "
                f"holds n_ctx={self.ctx.n_ctx}; raise n_ctx (--ctx) or use fewer images/slices (--max-slices)")
        # longest common prefix with the cache; always re-decode at least the last position
        old = self._kv
        lcp = 0
        lim = min(len(old), n - 1)
        while lcp < lim and old[lcp] == keys[lcp]:
            lcp += 1
        while lcp > 0 and isinstance(keys[lcp], tuple) and keys[lcp][2] != 0:
            lcp -= 1  # never start inside an image slot
        if not self.ctx.truncate(lcp):
            lcp = 0
        self._kv = old[:lcp]
        stats.prefill_start = lcp

        # vision for the slots that will be decoded (cached embeddings are reused)
        embs: dict[bytes, np.ndarray] = {}
        todo: dict[bytes, Media] = {}
        for start, slot, k in slots:
            if start + self.query_num > lcp and k not in embs and k not in todo:
                if k in self._emb_cache:
                    self._emb_cache.move_to_end(k)
                    embs[k] = self._emb_cache[k]
                else:
                    todo[k] = prompt.media[slot.media]
        batch: list[tuple[bytes, Media]] = []
        for i, (k, m) in enumerate(todo.items()):
            batch.append((k, m))
            # bounded batches: normalized pixels are 2.4 MB per 448x448 slice (long videos)
            if sum(len(b.frames) * b.n_slots for _, b in batch) >= VISION_BATCH_SLICES or i == len(todo) - 1:
                for (bk, _), e in zip(batch, self._encode([b for _, b in batch], max_slice_nums, stats)):
                    embs[bk] = e
                    self._remember(bk, e)
                batch = []

        t0 = time.perf_counter()
        b0 = self.ctx.n_batches
        try:
            self._decode_range(keys, embs, lcp, n, stats)
        except BaseException:
            self.reset()  # a failed batch may have left part of itself in the cache
            raise
        self._kv = keys
        stats.prefill_batches = self.ctx.n_batches - b0
        stats.tokens_prefilled = n - lcp
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3

    def _runs(self, keys: list, pos: int, n: int) -> list[tuple[bool, int, int]]:
        """Split positions pos..n into (as_embeddings, start, end) decode runs.

        Slot rows are embeddings. With `fuse_placeholders`, a short text run touching a slot (the
        "<image>", "</image><slice>", "</slice>\n<slice>" ... tokens of a placeholder) is sent as
        its embedding rows too, so a whole image goes through one embedding batch instead of one
        decode call per text run; long text stays token batches."""
        runs: list[list] = []
        while pos < n:
            emb = isinstance(keys[pos], tuple)
            end = pos
            while end < n and isinstance(keys[end], tuple) == emb:
                end += 1
            runs.append([emb, pos, end])
            pos = end
        if self.fuse_placeholders and self.tok_embd.available:
            for i, r in enumerate(runs):
                near_slot = (i > 0 and runs[i - 1][0]) or (i + 1 < len(runs) and runs[i + 1][0])
                if not r[0] and near_slot and r[2] - r[1] <= FUSE_MAX_TEXT:
                    r[0] = None  # text as embeddings (None: not a slot, but fused)
            merged: list[list] = []
            for r in runs:
                if merged and merged[-1][0] is not False and r[0] is not False:
                    merged[-1][2] = r[2]
                else:
                    merged.append(list(r))
            runs = merged
        return [(r[0] is not False, r[1], r[2]) for r in runs]

    def _rows(self, keys: list, embs: dict, s: int, e: int) -> np.ndarray:
        """Embedding rows for positions s..e: slot rows from the vision output, tokens from token_embd."""
        out = np.empty((e - s, self.lm.n_embd), dtype=np.float32)
        pos = s
        while pos < e:
            k = keys[pos]
            if isinstance(k, tuple):
                mk, idx, r0 = k
                r1 = min(r0 + (e - pos), self.query_num)
                out[pos - s:pos - s + r1 - r0] = embs[mk][idx][r0:r1]
                pos += r1 - r0
            else:
                end = pos
                while end < e and not isinstance(keys[end], tuple):
                    end += 1
                out[pos - s:end - s] = self.tok_embd.rows(keys[pos:end])
                pos = end
        return out

    def _decode_range(self, keys: list, embs: dict, pos: int, n: int, stats: ChatStats) -> None:
        cap = self.ctx.embd_capacity
        for emb, s, e in self._runs(keys, pos, n):
            if not emb:
                self.ctx.decode_tokens(keys[s:e], s, logits_last=e == n)
                continue
            for c in range(s, e, cap):  # bounded memory: rows are built one batch at a time
                ce = min(e, c + cap)
                self.ctx.decode_embd(self._rows(keys, embs, c, ce), c, logits_last=ce == n)
            stats.slots_prefilled += sum(1 for p in range(s, e) if isinstance(keys[p], tuple) and keys[p][2] == 0)

    def prefill(self, msgs: list[dict], *, enable_thinking: bool = False, system_prompt: str = "",
                max_slice_nums: int | None = None, use_image_id: bool | None = None,
                temporal_ids: list[list[int]] | None = None) -> np.ndarray:
        """Prefill the conversation (reusing the cache) and return a copy of the next-token logits."""
        prompt = self.build_prompt(msgs, enable_thinking=enable_thinking, system_prompt=system_prompt,
                                   max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                   temporal_ids=temporal_ids)
        self.stats = ChatStats()
        self._prefill(prompt, self.stats)
        return self.ctx.logits().copy()

    # -- chat ----------------------------------------------------------------------------------

    def chat(self, msgs: list[dict], *, enable_thinking: bool = False, stream: bool = False,
             max_new_tokens: int = 2048, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             system_prompt: str = "", max_slice_nums: int | None = None, use_image_id: bool | None = None,
             temporal_ids: list[list[int]] | None = None, greedy: bool = False,
             show_thinking: bool = True) -> "Answer | ChatStream":
        """Answer the last user message of `msgs` (the reference's `chat()` semantics).

        msgs: [{'role': 'user'|'assistant', 'content': str | [item, ...]}], first role user. Items:
        text (str), images (PIL.Image, a Path, a str naming an existing image file, or
        {'image': ...}) and videos (a video file path, {'video': path, 'fps': 5, 'packing': None,
        'max_frames': 180}, or a runtime.video.VideoFrames). A video becomes its sampled frames
        packed in temporal groups (one 64-token slot per group) with the model card's video
        settings (max_slice_nums 1, use_image_id False) unless given; the reference's own form,
        frames as images plus `temporal_ids`, works too.
        Sampling defaults (None) follow the reference: without thinking temperature 0.7, top_p 0.8,
        top_k 100, repetition_penalty 1.03; with thinking the reference passes only temperature 0.7,
        so its inner language model's transformers defaults fill in: top_p 1.0, top_k 50, no
        penalty. `greedy` takes the argmax (keeps a given repetition_penalty).
        Returns an `Answer` (str: the answer without its reasoning; `.thinking`, `.raw`, `.stats`);
        stream=True returns a ChatStream of Pieces (show_thinking=False leaves reasoning out).
        """
        t_start = time.perf_counter()
        defaults = THINKING_SAMPLING if enable_thinking else REFERENCE_SAMPLING
        sp = SamplingParams(
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            top_k=defaults.top_k if top_k is None else top_k,
            repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
            seed=seed, greedy=greedy)
        prompt = self.build_prompt(msgs, enable_thinking=enable_thinking, system_prompt=system_prompt,
                                   max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                   temporal_ids=temporal_ids)
        stats = ChatStats()
        self.stats = stats
        self._prefill(prompt, stats)
        gen = self._generate(self._kv, sp, max_new_tokens, enable_thinking, show_thinking, stats, t_start)
        if stream:
            s = ChatStream(gen)

            def run():
                self.last = yield from gen
                s.result = self.last
            s._gen = run()
            return s
        while True:
            try:
                next(gen)
            except StopIteration as e:
                self.last = e.value
                return e.value

    def _generate(self, kv: list, sp: SamplingParams, max_new_tokens: int, thinking: bool,
                  show_thinking: bool, stats: ChatStats, t_start: float):
        """Sample/decode loop; yields Pieces, returns the Answer. `kv` is the cache contents this
        turn was prefilled into: a later chat()/prefill()/reset() replaces self._kv, and a stream
        of this turn resumed after that stops with an error instead of decoding into the new cache."""
        ctx, lm = self.ctx, self.lm
        sampler = Sampler(lm.n_vocab, sp)
        stops, is_eog, piece = self.stop_ids, lm.is_eog, lm.piece
        think_end = self.think_end_id
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n_ctx = ctx.n_ctx
        pos = len(kv)
        in_think = thinking
        think_parts: list[str] = []
        answer_parts: list[str] = []
        tokens: list[int] = []
        lead = True       # strip the newlines that open the answer (template: lstrip after </think>)
        if thinking and show_thinking:
            yield Piece(THINK_START + "\n", True)  # the prompt opened the block, as the reference's stream
        stats.finish_reason = "length"
        t0 = time.perf_counter()
        try:
            for _ in range(max_new_tokens):
                tok = sampler.sample(ctx)
                if not tokens:
                    stats.ttft_ms = (time.perf_counter() - t_start) * 1e3
                if tok in stops or is_eog(tok):
                    stats.finish_reason = "stop"
                    break
                tokens.append(tok)
                if in_think and tok == think_end:
                    in_think = False
                    text = utf8.decode(b"", final=True)
                    think_parts.append(text)
                    if show_thinking:
                        yield Piece(text + THINK_END, True)
                else:
                    text = utf8.decode(piece(tok))
                    if in_think:
                        think_parts.append(text)
                        if show_thinking and text:
                            yield Piece(text, True)
                    else:
                        if lead and thinking:  # "\n\n" after </think>: part of the block's format
                            body = text.lstrip("\n")
                            if show_thinking and len(body) < len(text):
                                yield Piece(text[:len(text) - len(body)], True)
                            text = body
                        if text:
                            lead = False
                            answer_parts.append(text)
                            yield Piece(text, False)
                if pos >= n_ctx:
                    stats.finish_reason = "context"
                    break
                if self._kv is not kv:
                    raise RuntimeError("this chat() stream was resumed after a newer chat()/prefill()/reset() "
                                       "call replaced its KV cache")
                ctx.decode_one(tok, pos)
                kv.append(tok)
                pos += 1
            tail = utf8.decode(b"", final=True)
            if tail:
                (think_parts if in_think else answer_parts).append(tail)
                if not in_think or show_thinking:
                    yield Piece(tail, in_think)
        finally:
            sampler.close()
            stats.decode_tokens = len(tokens)
            stats.decode_ms = (time.perf_counter() - t0) * 1e3
        generated = lm.detokenize(tokens)
        raw = (THINK_START + "\n" if thinking else "") + generated.strip()  # the reference's return value
        if thinking and think_end is not None and think_end not in tokens:
            # unfinished reasoning (length limit): everything is thinking, no answer yet
            return Answer("", "".join(think_parts).strip(), raw, stats, tokens)
        return Answer("".join(answer_parts).strip(), "".join(think_parts).strip(), raw, stats, tokens)
