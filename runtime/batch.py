"""Several conversations at once on one model: continuous batching over llama.cpp sequences, as
llama-server's slots do it.

On a CPU, decoding is bound by memory bandwidth: one llama_decode reads every weight once whether it
advances one sequence or four, so decoding N conversations in one batch costs little more than one.
`BatchChat` keeps N slots, one llama.cpp sequence each, in one context (llama.cpp's non-unified KV
cache: each sequence its own n_ctx / N cells). A request takes the free slot whose sequence shares
the longest prefix with its prompt (what that slot answered last stays cached, so the same
conversation's next turn decodes only its new tokens). Each `step()` makes one llama_decode:

- one token for every slot that is generating (its last sampled token), and
- up to `chunk` prompt positions of one slot that is being prefilled (slots take turns), so a new
  request's long prompt (an image is ~700 positions) never stops the other streams for more than
  one chunk's time.

A prompt chunk of embedding rows (image slots and the text around them, runtime/kv_cache.py) and the
generating slots' tokens go in one embedding batch: the tokens as their token_embd rows, which is
exactly what llama.cpp's get_rows would feed the first layer. Images are encoded by a vision thread
while the decode loop goes on (the vision cache is shared; runtime/vision_cache.py), and a slot
starts prefilling once its embeddings are ready.

Every request is answered exactly as `MiniCPMV.chat` answers it alone (its own sampler, seed, stop
strings, limits), with the caveat of runtime/chat.py's `load` docstring: with the default f16 KV cache
and flash attention, logits move by ~1e-4 of their range with how positions were batched.

Size: about 400 lines: one scheduler whose step reads as one loop over the slots' states
(what each sequence holds is kept consistent there); the request and slot records are beside it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import next_turn
from .compute_thread import side_thread
from .generate import Generation
from .kv_cache import KVContents, Part, chunk_steps, plan_steps, step_rows
from .llama_backend import ContextOverflowError
from .llama_context import ContextParams, LlamaContext
from .prompt import prompt_options
from .results import Answer, ChatStats, Piece
from .sampler import Sampler, sampling_params

SIMILARITY = 0.5  # share of a prompt a slot must hold to be picked for it (llama-server's default)
ALONE_CHUNKS = 2  # chunks a step takes of a prompt that no other request is waiting beside
CHUNK = 32  # prompt positions per step: a chunk's time is what the other streams wait (BENCHMARKS.md §4d)


@dataclass
class BatchRequest:
    """One conversation to answer: MiniCPMV.chat's `msgs` and keyword arguments (no `stream`);
    `on_piece` gets each Piece as it is made, `on_done` the request once answered or failed (both
    from the thread that steps the batch)."""

    msgs: list[dict]
    kwargs: dict = field(default_factory=dict)
    on_piece: Callable[[Piece], None] | None = None
    on_done: Callable[["BatchRequest"], None] | None = None
    answer: Answer | None = None
    error: BaseException | None = None
    stats: ChatStats = field(default_factory=ChatStats)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def finish(self) -> None:
        self.finished.set()
        if self.on_done is not None:
            self.on_done(self)


@dataclass
class _Slot:
    seq: int
    kv: KVContents = field(default_factory=KVContents)  # what the sequence holds, decoded
    req: BatchRequest | None = None
    target: KVContents | None = None  # the prompt being prefilled
    keep: int = 0  # positions reused from the cache (the prompt is decoded from here)
    parts: deque = field(default_factory=deque)  # (embeddings?, [Part]) chunks left to decode
    embs: dict | None = None
    vision: Future | None = None
    gen: Generation | None = None
    sampler: Sampler | None = None
    max_new: int = 0
    next_tok: int | None = None  # sampled, decoded in the next step
    pos: int = 0  # where next_tok goes
    last_used: float = 0.0
    prefill_s: float = 0.0
    history: KVContents | None = None  # the next turn's prefix, decoded while idle (next_turn.py)

    @property
    def state(self) -> str:
        if self.req is None:
            return "free"
        if self.next_tok is not None:
            return "generating"
        return "prefilling" if self.embs is not None else "encoding"


class BatchChat:
    """Up to `n_seq` conversations of `model` decoded together (module docstring). Drive it with
    `step()` (one llama_decode) from one thread; `submit` may be called from any thread."""

    def __init__(self, model, n_seq: int, n_ctx_seq: int, *, chunk: int = CHUNK, follow_ups: bool = False):
        """follow_ups: while idle, decode each answered conversation's next-turn prefix (a server,
        whose clients resend the conversation; runtime/next_turn.py)."""
        self.model, self.chunk, self.follow_ups = model, chunk, follow_ups
        base = model._context.params
        self.ctx = LlamaContext(
            model.lm,
            ContextParams(
                n_ctx=n_seq * n_ctx_seq,
                n_batch=max(base.n_batch, chunk + n_seq),
                n_threads=base.n_threads,
                kv_type=base.kv_type,
                flash_attn=base.flash_attn,
                n_seq=n_seq,
            ),
        )
        self.n_ctx_seq = self.ctx.n_ctx_seq
        self.slots = [_Slot(i) for i in range(n_seq)]
        self._waiting: deque[BatchRequest] = deque()
        self._lock = threading.Lock()
        self._vision_lock = threading.Lock()  # one encode at a time, as one vision thread did
        self._encodes: set[Future] = set()
        self.steps = 0  # llama_decode calls made
        self.warmed = 0  # positions decoded ahead for follow-ups while idle

    # -- requests ------------------------------------------------------------------------------

    def submit(self, req: BatchRequest) -> BatchRequest:
        with self._lock:
            self._waiting.append(req)
        return req

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.req is not None for s in self.slots)

    def run(self, requests: list[BatchRequest]) -> list[BatchRequest]:
        """Submit `requests` and step until every one is answered (the Python API's chat_many)."""
        for r in requests:
            self.submit(r)
        while self.busy:
            self.step()
        return requests

    def close(self) -> None:
        wait(list(self._encodes))
        self.ctx.close()

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting requests, then one llama_decode over the slots; False when there was
        nothing to do (the caller may wait)."""
        self._drop_cancelled()
        self._admit()
        gen = [s for s in self.slots if s.state == "generating"]
        pre = self._next_prefill()
        if not gen and pre is None:
            # encoding (the vision thread works, nothing to decode yet), or idle: warm a follow-up
            return bool(self.busy) or self._warm()
        self._decode(gen, pre)
        return True

    @property
    def waiting(self) -> int:
        """Requests not yet in a slot."""
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return sum(s.req is None for s in self.slots)

    def _drop_cancelled(self) -> None:
        for s in self.slots:
            if s.req is not None and s.req.cancelled.is_set():
                self._end(s, cancelled=True)
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled.is_set()]
            self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
        for r in dropped:
            r.finish()

    def _admit(self) -> None:
        while True:
            free = [s for s in self.slots if s.req is None]
            with self._lock:
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            try:
                self._start(req, free)
            except Exception as e:  # noqa: BLE001 - the request's own fault (prompt, media, length)
                req.error = e
                req.finish()

    def _start(self, req: BatchRequest, free: list[_Slot]) -> None:
        """Build the prompt, pick the slot that holds most of it, start its vision."""
        m, kw = self.model, dict(req.kwargs)
        think = kw.get("enable_thinking", False)
        prompt = m.build_prompt(req.msgs, **prompt_options(kw))
        target, keys = m.prompt_runs(prompt)
        n = len(target)
        st = req.stats
        st.prompt_tokens = n
        if n + 1 > self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt needs {n} positions, more than a slot's {self.n_ctx_seq} (n_ctx={self.n_ctx_seq})"
            )
        slot = self._pick(free, target)
        keep = slot.kv.common_prefix(target, limit=n - 1)
        if not self.ctx.truncate(keep, slot.seq):
            keep = 0
        slot.kv = slot.kv.prefix(keep)
        slot.req, slot.target, slot.keep, slot.prefill_s, slot.history = req, target, keep, 0.0, None
        st.prefill_start = keep
        media = dict(zip(reversed(keys), reversed(prompt.media)))
        wanted = {r.media_key: media[r.media_key] for p, r in target.slots() if p >= keep}
        fuse = m.fuse_placeholders and m.tok_embd.available
        slot.parts = deque(chunk_steps(plan_steps(target, keep, fuse), self.chunk))
        slot.sampler = Sampler(
            m.lm.n_vocab,
            sampling_params(
                think,
                kw.get("temperature"),
                kw.get("top_p"),
                kw.get("top_k"),
                kw.get("repetition_penalty"),
                kw.get("seed"),
                kw.get("greedy", False),
            ),
        )
        slot.max_new = kw.get("max_new_tokens", 2048)
        slot.gen = Generation(
            m.lm,
            max_new_tokens=slot.max_new,
            thinking=think,
            show_thinking=kw.get("show_thinking", True),
            stop_ids=m.stop_ids,
            think_end=m.think_end_id,
            stats=st,
            t_start=req.t_submit,
            room=self.n_ctx_seq - n,
            stop=tuple(kw.get("stop", ())),
        )
        slot.embs = None
        slot.vision = self._encode(m.vision_cache.embeddings, wanted, prompt.max_slice_nums, st) if wanted else None
        if slot.vision is None:
            slot.embs = {}

    def _encode(self, fn, *args) -> Future:
        """fn(*args) (a vision encode) on a thread of its own while the streams go on decoding on the
        compute thread; the thread exits when it is done, taking its OpenMP team with it
        (compute_thread.side_thread)."""

        def job():
            with self._vision_lock:
                return fn(*args)

        fut = side_thread(job, name="batch-vision")
        self._encodes.add(fut)
        fut.add_done_callback(self._encodes.discard)
        return fut

    @staticmethod
    def _pick(free: list[_Slot], target: KVContents) -> _Slot:
        """The free slot holding the longest prefix of the prompt, if that is at least SIMILARITY of
        it (the same conversation's next turn); else the one unused longest, so a new conversation
        does not push out a cached one for the few template tokens every prompt starts with
        (llama-server's slot_prompt_similarity)."""
        n = len(target)
        best = max(free, key=lambda s: (s.kv.common_prefix(target, limit=n - 1), -s.last_used))
        if best.kv.common_prefix(target, limit=n - 1) >= SIMILARITY * n:
            return best
        return min(free, key=lambda s: (len(s.kv) > 0, s.last_used))

    def _next_prefill(self) -> _Slot | None:
        """The prefilling slot (its images encoded) with the least prompt left: a short question
        that arrives while an image is being read gets its first token after a chunk or two,
        instead of after the image's whole prompt (ties: the one that has waited longest)."""
        for s in self.slots:
            if s.state == "encoding" and s.vision.done():
                try:
                    s.embs = s.vision.result()
                except Exception as e:  # noqa: BLE001
                    self._end(s, error=e)
        ready = [s for s in self.slots if s.state == "prefilling"]
        if not ready:
            return None
        return min(ready, key=lambda s: (len(s.parts), s.req.t_submit))

    def _take(self, pre: _Slot, alone: bool) -> tuple[bool, list[Part]]:
        """The next chunk of `pre`'s prompt. With nobody else to stall (no slot generating or
        waiting), ALONE_CHUNKS consecutive chunks of one kind go together: fewer steps for a lone
        prompt (each step reads every weight once), while a request arriving meanwhile waits for at
        most that step (BENCHMARKS.md §4d: chunk sizes, step times, time to first token)."""
        emb, parts = pre.parts.popleft()
        if alone:
            room = min(self.ctx.embd_capacity if emb else self.ctx.n_batch, ALONE_CHUNKS * self.chunk)
            n = sum(p.hi - p.lo for p in parts)
            while pre.parts and pre.parts[0][0] == emb and n + sum(p.hi - p.lo for p in pre.parts[0][1]) <= room:
                more = pre.parts.popleft()[1]
                n += sum(p.hi - p.lo for p in more)
                parts = parts + more
        return emb, parts

    def _decode(self, gen: list[_Slot], pre: _Slot | None) -> None:
        n_embd = self.model.lm.n_embd
        alone = not gen and not self.waiting and sum(s.req is not None for s in self.slots) == 1
        emb_chunk, parts = self._take(pre, alone) if pre is not None else (False, [])
        tokens, pos, seq, want = [], [], [], []
        for s in gen:
            tokens.append(s.next_tok)
            pos.append(s.pos)
            seq.append(s.seq)
            want.append(1)
        first_pre = len(tokens)
        if pre is not None:
            start = parts[0].start
            end = parts[-1].start + parts[-1].hi - parts[-1].lo
            n = len(pre.target)
            pos += list(range(start, end))
            seq += [pre.seq] * (end - start)
            want += [0] * (end - start - 1) + [1 if end == n else 0]
        t0 = time.perf_counter()
        if emb_chunk:
            rows = np.empty((len(pos), n_embd), np.float32)
            if gen:
                rows[:first_pre] = self.model.tok_embd.rows(tokens)
            if pre is not None:
                rows[first_pre:] = step_rows(parts, start, end, pre.embs, self.model.tok_embd, n_embd)
            self.ctx.decode_mixed(np.array(pos), np.array(seq), np.array(want), rows=rows)
        else:
            if pre is not None:
                tokens += [t for p in parts for t in p.run.tokens[p.lo : p.hi]]
            self.ctx.decode_mixed(np.array(pos), np.array(seq), np.array(want), tokens=np.array(tokens, np.int32))
        dt = time.perf_counter() - t0
        self.steps += 1
        for i, s in enumerate(gen):  # each generating slot: its token is in the cache now
            s.kv.append_token(s.next_tok)
            s.pos += 1
            s.next_tok = None
            if len(s.gen.tokens) >= s.max_new:
                self._end(s)
            else:
                self._advance(s, i)
        if pre is not None:
            pre.prefill_s += dt
            pre.req.stats.slots_prefilled += sum(1 for p in parts if p.run.is_slot and p.lo == 0)
            if not pre.parts:  # the prompt is in: sample its first token
                st = pre.req.stats
                pre.kv = pre.target
                st.tokens_prefilled = len(pre.target) - pre.keep
                st.prefill_ms = pre.prefill_s * 1e3
                pre.pos = len(pre.target)
                self._emit(pre, pre.gen.opening())
                if pre.max_new > 0:
                    self._advance(pre, len(pos) - 1)
                else:
                    self._end(pre)

    def _warm(self) -> bool:
        """One chunk of an idle slot's next-turn prefix (runtime/next_turn.py); False if none is left."""
        for s in self.slots:
            if s.history is None:
                continue
            keep = next_turn.text_left(s.kv, s.history)
            if keep is None or len(s.history) >= self.n_ctx_seq or not self.ctx.truncate(keep, s.seq):
                s.history = None
                continue
            s.kv = s.kv.prefix(keep)
            pos, tokens = next_turn.warm_chunks(s.history, keep)[0]
            n = len(tokens)
            toks = np.array(tokens, np.int32)
            try:
                self.ctx.decode_mixed(np.arange(pos, pos + n), np.full(n, s.seq), np.zeros(n), tokens=toks)
            except Exception:  # noqa: BLE001 - an optimisation only: the slot keeps what it held before
                self.ctx.truncate(keep, s.seq)
                s.history = None
                continue
            self.steps += 1
            self.warmed += n
            s.kv = s.history.prefix(pos + n)
            return True
        return False

    def _advance(self, s: _Slot, idx: int) -> None:
        """Sample slot `s`'s next token from batch entry `idx` and turn it into pieces."""
        tok = s.sampler.sample(self.ctx, idx)
        self._emit(s, s.gen.feed(tok))
        if s.gen.done:
            self._end(s)
        else:
            s.next_tok = tok

    def _emit(self, s: _Slot, pieces: list[Piece]) -> None:
        if s.req.on_piece is not None:
            for p in pieces:
                s.req.on_piece(p)

    def _end(self, s: _Slot, error: BaseException | None = None, cancelled: bool = False) -> None:
        """The slot's request is answered (or failed, or cancelled); the slot keeps what its
        sequence holds for the next request of the same conversation."""
        req = s.req
        if error is None and not cancelled:
            self._emit(s, s.gen.close())
            req.answer = s.gen.answer()
            if self.follow_ups:
                try:
                    s.history = next_turn.history_prefix(self.model, req.msgs, str(req.answer), req.kwargs)
                except Exception:  # noqa: BLE001 - an optimisation only: the next request decodes what it needs
                    s.history = None
        else:
            req.error = error
            if s.gen is not None:
                s.gen.close()  # the counters land
            self.ctx.truncate(len(s.kv), s.seq)  # a half-prefilled prompt's positions go
        if s.sampler is not None:
            s.sampler.close()
        s.req, s.target, s.gen, s.sampler, s.next_tok, s.embs, s.vision = None, None, None, None, None, None, None
        s.parts.clear()
        s.last_used = time.monotonic()
        req.finish()
