"""`MiniCPMV`: image (and video-frame) chat on llama.cpp kernels, with the reference's prompt.

    model = MiniCPMV.load("MiniCPM-V-4.5-Q4_K_M.gguf", "mmproj-MiniCPM-V-4.5-F16.gguf")
    answer = model.chat([{"role": "user", "content": [Image.open("cat.jpg"), "What is this?"]}])
    print(answer, answer.thinking, answer.stats.decode_tps)

One turn: load the content (content.py) and render the whole conversation exactly as the reference
`chat()` does (prompt.py), tokenize the text pieces with llama.cpp, keep the KV cache up to the
longest common prefix with what is already decoded (kv_cache.py: token ids and image-slot
identities), make the context hold the turn (context_size.py: created at the first prefill, grown
with the conversation, unless n_ctx is fixed), encode the images that are not cached yet
(vision_cache.py over vision.py, torch on the CPU), prefill from the first differing position, then
sample until a stop token (generate.py).

Return value: `Answer`, a `str` holding the answer with the thinking removed and stripped; its
`.thinking` is the reasoning text (empty when thinking is off), `.raw` is what the reference's
`chat()` returns ("<think>\\n" + generated text when thinking), `.stats` the turn's counters and
timings. `stream=True` returns a `ChatStream`: an iterator of `Piece` strings (each with a
`.thinking` flag); after it is exhausted `.result` holds the `Answer`. `model.last` is the last
`Answer` either way.

Threads: calls on one model are served one at a time (turn.py): chat(), prefill(), reset() and
close() wait for the model's turn, and a stream keeps it until it is exhausted, closed or freed,
whichever thread reads it.

Size: a little over 350 lines, most of them the public API's two long signatures (load, chat: one
argument a line as the formatter writes them) and their documentation; each job is delegated.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from minicpmv.schema import QUERY_NUM, SLOT_TOKEN, STOP_TOKENS, THINK_END

from .content import Content
from .context_size import ContextChange, GrowingContext
from .generate import generate
from .kv_cache import KVContents, SlotRun, TextRun, decode, plan_steps
from .llama import LlamaModel
from .llama_context import ContextParams, LlamaContext
from .loader import load_pair
from .prompt import Prompt, Slot
from .results import Answer, ChatStats, ChatStream
from .sampler import sampling_params
from .token_embeddings import TokenEmbeddings
from .turn import TurnLock
from .vision_cache import EmbeddingCache, media_key


class MiniCPMV:
    """MiniCPM-V 4.5: llama.cpp language model + torch vision encoder, one conversation's KV cache."""

    def __init__(
        self,
        lm: LlamaModel,
        ctx: LlamaContext | None,
        vision,
        *,
        cache_bytes: int = 1 << 30,
        fuse_placeholders: bool = True,
        ctx_params: ContextParams | None = None,
        n_ctx: int | None = None,
    ):
        """`ctx` fixes the context; `n_ctx` fixes its size (made at the first prefill); neither sizes
        it per turn with `ctx_params` (context_size.py)."""
        self.lm, self.vision = lm, vision
        self._context = GrowingContext(lm, ctx_params or ContextParams(), fixed=ctx, fixed_size=n_ctx)
        self.fuse_placeholders = fuse_placeholders  # placeholder tokens as embedding rows (kv_cache.py)
        self.tok_embd = TokenEmbeddings(lm.file, lm.n_embd)
        self.query_num = getattr(vision, "query_num", QUERY_NUM) if vision is not None else QUERY_NUM
        self.progress = False  # a progress bar (stderr) while many slices/frames are encoded
        self.vision_cache = EmbeddingCache(vision, cache_bytes)
        self.content = Content()
        self._kv = KVContents()  # what the KV cache holds
        self.stop_ids = frozenset(t for t in (lm.token_id(s) for s in STOP_TOKENS) if t is not None)
        self.think_end_id = lm.token_id(THINK_END)
        self.last: Answer | None = None
        self.stats = ChatStats()
        self._turn = TurnLock()  # one caller at a time on the KV cache and the context

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_path: str | os.PathLike,
        mmproj_path: str | os.PathLike | None = None,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        vision_dtype: str = "auto",
        n_batch: int = 512,
        kv_type: str | None = None,
        flash_attn: bool | None = None,
        fuse_placeholders: bool = True,
        verbose: bool = False,
        low_memory: bool = False,
    ) -> "MiniCPMV":
        """Load the language model GGUF and the mmproj GGUF, or a folder holding both.

        `n_gpu_layers` None = all layers on Metal on macOS, CPU elsewhere. llama.cpp's defaults keep
        the KV cache in f16 and use flash attention (f16 math on the CPU), so logits move by ~1e-4 of
        their range with how positions were batched; `kv_type="f32", flash_attn=False` makes them
        reproducible to ~1e-7 (more memory, slower attention). `fuse_placeholders=False` decodes
        every text run as tokens and every slot as its own 64-row batch (mtmd's layout). `n_ctx` None
        (default): the context is created at the first prefill for what the turn needs and grows with
        the conversation (context_size.py); an int fixes its size (made at the first prefill). Raises
        ModelFileError (one line) for missing/unreadable files or a mmproj whose width does not
        match the language model.

        `kv_type`: "f16" (default), "q8_0" (default with low_memory), "f32".
        `low_memory` (8 GB machines): the KV cache in q8_0 (half of f16); the vision weights are not
        kept but read from the mmproj (page cache) for every image, one slice at a time. Costs and
        peak memory of both profiles: BENCHMARKS.md.
        """
        lm, vision, params = load_pair(
            model_path,
            mmproj_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            vision_dtype=vision_dtype,
            n_batch=n_batch,
            kv_type=kv_type,
            flash_attn=flash_attn,
            verbose=verbose,
            low_memory=low_memory,
        )
        return cls(lm, None, vision, fuse_placeholders=fuse_placeholders, ctx_params=params, n_ctx=n_ctx)

    @property
    def ctx(self) -> LlamaContext | None:
        """The llama.cpp context (None before the first prefill when it is sized per turn)."""
        return self._context.ctx

    def watch_context(self, fn: Callable[[ContextChange], None] | None) -> None:
        """Call fn(ContextChange) whenever the context is created or grown (and now, if one exists):
        its size and KV cache bytes."""
        self._context.watch(fn)

    def close(self) -> None:
        """Free the context and the language model, stop the vision workers, close both files."""
        with self._turn.call():
            self._context.close()
            self.lm.close()
            if self.vision is not None:
                self.vision.close()

    @property
    def busy(self) -> bool:
        """A call is running or a stream is open (other threads' calls would wait)."""
        return self._turn.busy

    def __enter__(self) -> "MiniCPMV":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the KV cache (the image-embedding cache is kept; the context keeps its size)."""
        with self._turn.call():
            self._clear()

    def _clear(self) -> None:
        if self.ctx is not None:
            self.ctx.clear()
        self._kv = KVContents()

    # -- prompt --------------------------------------------------------------------------------

    def build_prompt(
        self,
        msgs: list[dict],
        *,
        enable_thinking: bool = False,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: list[list[int]] | None = None,
    ) -> Prompt:
        """The reference's prompt for `msgs`, with the per-conversation defaults of content.py."""
        return self.content.prompt(
            msgs,
            enable_thinking=enable_thinking,
            system_prompt=system_prompt,
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            temporal_ids=temporal_ids,
            query_num=self.query_num,
        )

    def prompt_token_ids(self, prompt: Prompt, slot_id: int | None = None) -> list[int]:
        """The prompt as the reference's input ids (slots as `<unk>` unless `slot_id` is given)."""
        if slot_id is None:
            slot_id = self.lm.token_id(SLOT_TOKEN)
        return prompt.token_ids(self.lm.tokenize, slot_id, self.query_num)

    def prompt_runs(self, prompt: Prompt) -> tuple[KVContents, list[bytes]]:
        """The prompt as KV cache runs (text pieces tokenized by llama.cpp, slots named by their
        media item's content key), and the key of each media item."""
        keys = [media_key(m, prompt.max_slice_nums) for m in prompt.media]
        runs = [
            SlotRun(keys[s.media_index], s.index, self.query_num)
            if isinstance(s, Slot)
            else TextRun(self.lm.tokenize(s))
            for s in prompt.segments
        ]
        return KVContents(runs), keys

    # -- prefill -------------------------------------------------------------------------------

    def _prefill(self, prompt: Prompt, stats: ChatStats, room: int = 1) -> None:
        """Decode `prompt` into the KV cache, in a context with `room` positions after it (up to the limit)."""
        seq, keys = self.prompt_runs(prompt)
        n = len(seq)
        stats.prompt_tokens = n
        slots = seq.slots()
        self._context.check_prompt(
            n, f"{len(slots)} image slots x {self.query_num} + {n - len(slots) * self.query_num} text tokens"
        )
        start = self._kv.common_prefix(seq, limit=n - 1)  # always re-decode at least the last position
        if self.ctx is not None and not self.ctx.truncate(start):
            start = 0

        # vision for the slots that will be decoded (cached embeddings are reused), before the
        # context is made or grown: the encoder's working memory is free again by then
        media = dict(zip(reversed(keys), reversed(prompt.media)))  # the first item of equal content

        def encode(first: int) -> dict:
            wanted = {slot.media_key: media[slot.media_key] for pos, slot in slots if pos >= first}
            return self.vision_cache.embeddings(wanted, prompt.max_slice_nums, stats, self.progress)

        embs = encode(start)
        kept, self._kv = self._kv, KVContents()  # empty while the context may be replaced
        new_start = self._context.make_room(n + max(1, room), start, stats)
        if new_start < start:  # the cache could not be carried over: earlier slots are decoded too
            embs = encode(new_start)
        start = new_start
        self._kv = kept.prefix(start)
        stats.prefill_start = start

        t0 = time.perf_counter()
        b0 = self.ctx.n_batches
        try:
            decode(
                self.ctx,
                plan_steps(seq, start, self.fuse_placeholders and self.tok_embd.available),
                n,
                embs,
                self.tok_embd,
                stats,
            )
        except BaseException:
            self._clear()  # a failed batch may have left part of itself in the cache
            raise
        self._kv = seq
        stats.prefill_batches = self.ctx.n_batches - b0
        stats.tokens_prefilled = n - start
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3

    def prefill(
        self,
        msgs: list[dict],
        *,
        enable_thinking: bool = False,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: list[list[int]] | None = None,
    ) -> np.ndarray:
        """Prefill the conversation (reusing the cache) and return a copy of the next-token logits."""
        with self._turn.call():
            prompt = self.build_prompt(
                msgs,
                enable_thinking=enable_thinking,
                system_prompt=system_prompt,
                max_slice_nums=max_slice_nums,
                use_image_id=use_image_id,
                temporal_ids=temporal_ids,
            )
            self.stats = ChatStats()
            self._prefill(prompt, self.stats)
            return self.ctx.logits().copy()

    # -- chat ----------------------------------------------------------------------------------

    def chat(
        self,
        msgs: list[dict],
        *,
        enable_thinking: bool = False,
        stream: bool = False,
        max_new_tokens: int = 2048,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: list[list[int]] | None = None,
        greedy: bool = False,
        show_thinking: bool = True,
        stop: list[str] | tuple[str, ...] = (),
    ) -> "Answer | ChatStream":
        """Answer the last user message of `msgs` (the reference's `chat()` semantics).

        msgs: [{'role': 'user'|'assistant', 'content': str | [item, ...]}], first role user; the
        content items (text, images, videos) and the video defaults are those of content.py. The
        reference's own video form, frames as images plus `temporal_ids`, works too.
        Sampling defaults (None) follow the reference (docs/reference-model.md §6.2):
        schema.REFERENCE_SAMPLING without thinking; with thinking the reference passes only the
        temperature, so its inner language model's transformers defaults fill in
        (schema.THINKING_SAMPLING). `greedy` takes the argmax (keeps a given repetition_penalty).
        Returns an `Answer` (str: the answer without its reasoning; `.thinking`, `.raw`, `.stats`);
        stream=True returns a ChatStream of Pieces (show_thinking=False leaves reasoning out), which
        keeps the model's turn until it is exhausted or closed. `stop`: strings that end the answer
        (not the reasoning) before them, finish_reason "stop" (an extension: the reference has none).
        """
        t_start = time.perf_counter()
        sp = sampling_params(enable_thinking, temperature, top_p, top_k, repetition_penalty, seed, greedy)
        hold = self._turn.acquire(stream=stream)
        handed_over = False  # to the ChatStream, which gives the turn back when it ends
        try:
            prompt = self.build_prompt(
                msgs,
                enable_thinking=enable_thinking,
                system_prompt=system_prompt,
                max_slice_nums=max_slice_nums,
                use_image_id=use_image_id,
                temporal_ids=temporal_ids,
            )
            stats = ChatStats()
            self.stats = stats
            self._prefill(prompt, stats, room=max_new_tokens)
            gen = generate(
                self.ctx,
                self.lm,
                self._kv,
                sp,
                max_new_tokens=max_new_tokens,
                thinking=enable_thinking,
                show_thinking=show_thinking,
                stop_ids=self.stop_ids,
                think_end=self.think_end_id,
                stats=stats,
                t_start=t_start,
                stop=tuple(stop),
            )
            if stream:
                out = ChatStream(gen, on_result=self._finished, stats=stats, hold=hold)
                handed_over = True
                return out
            while True:
                try:
                    next(gen)
                except StopIteration as e:
                    self._finished(e.value)
                    return e.value
        finally:
            if not handed_over:
                hold.release()

    def _finished(self, answer: Answer) -> None:
        self.last = answer

    def chat_many(
        self, conversations: list[list[dict]], *, n_seq: int | None = None, n_ctx_seq: int = 4096, **kwargs
    ) -> list[Answer]:
        """Answer several conversations at once: one llama.cpp sequence each (at most `n_seq` at a
        time, default all), decoded together so each decode step reads the weights once for all of
        them (runtime/batch.py). `kwargs` are chat()'s (not `stream`), the same for every
        conversation; each answer is the one chat() gives it alone. A context of `n_ctx_seq`
        positions per sequence is made for the call and freed after it. Raises the first
        conversation's error, if any failed."""
        from .batch import BatchChat, BatchRequest

        if kwargs.pop("stream", False):
            raise ValueError("chat_many does not stream: use chat(stream=True) per conversation")
        with self._turn.call():
            batch = BatchChat(self, max(1, min(n_seq or len(conversations), len(conversations))), n_ctx_seq)
            try:
                reqs = batch.run([BatchRequest(msgs, kwargs) for msgs in conversations])
            finally:
                batch.close()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.answer for r in reqs]
