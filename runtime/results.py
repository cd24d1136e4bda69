"""What a chat() turn returns: the answer (a str with its reasoning and counters attached), the
streamed pieces, and the turn's counters and timings."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Generator


@dataclass
class ChatStats:
    """Counters and timings of one chat() turn (the tests assert on the counters)."""

    prompt_tokens: int = 0  # positions in the full prompt (text tokens + 64 per slot)
    prefill_start: int = 0  # first position decoded this turn (= reused KV length)
    tokens_prefilled: int = 0  # positions decoded during prefill (text + embedding rows)
    slots_prefilled: int = 0  # image slots decoded this turn
    prefill_batches: int = 0  # llama_decode calls of the prefill
    images_encoded: int = 0  # media items run through the vision encoder this turn
    slots_encoded: int = 0  # overview/slice outputs computed this turn
    vision_ms: list[float] = field(default_factory=list)  # per encoded slot
    prefill_ms: float = 0.0  # LM prefill (excludes vision)
    decode_tokens: int = 0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0  # start of chat() to the first sampled token
    finish_reason: str = ""  # "stop", "length" (max_new_tokens) or "context" (n_ctx full)
    n_ctx: int = 0  # positions the context held this turn (context_size.py)
    ctx_grows: int = 0  # 1 if this turn replaced the context by a larger one
    tokens_kept: int = 0  # KV positions copied into the larger context (not decoded again)

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
    """Iterator of `Piece`s; `.result` is the `Answer` once the iterator is exhausted (and is handed to
    `on_result`, if given), `.stats` the turn's ChatStats (decode counters land when it ends).

    The stream holds the model's turn (`hold`, runtime/turn.py) from its chat() call until it is
    exhausted, fails, is closed, or is freed, whichever thread reads it. No reference cycle runs
    through it, so dropping the last reference ends it at once: a finalizer closes the generator
    (which frees its sampler and records the decode counters) and gives the turn back. close() may
    be called from any thread; it waits for a piece being computed.
    """

    def __init__(
        self,
        gen: Generator[Piece, None, Answer],
        on_result: Callable[[Answer], None] | None = None,
        *,
        stats: ChatStats | None = None,
        hold=None,
    ):
        self.result: Answer | None = None
        self.stats = stats
        self._gen, self._on_result, self._hold = gen, on_result, hold
        self._step = threading.Lock()  # one piece at a time; close() waits for the current one
        self._end = weakref.finalize(self, _end_stream, gen, hold)
        self._end.atexit = False  # at exit llama.cpp may be gone: nothing to give back then

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> Piece:
        with self._step:
            if not self._end.alive:
                raise StopIteration
            if self._hold is not None:
                self._hold.touch()
            try:
                return next(self._gen)
            except StopIteration as e:
                self.result = e.value
                if self._on_result is not None:
                    self._on_result(self.result)  # before another caller gets the turn
                self._end()
                raise StopIteration from None
            except BaseException:
                self._end()
                raise

    def close(self) -> None:
        """End the stream now (the answer so far is lost; `.result` stays None unless it had ended) and
        give the model's turn back. Safe to call more than once."""
        with self._step:
            self._end()

    @property
    def closed(self) -> bool:
        return not self._end.alive

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _end_stream(gen: Generator, hold) -> None:
    """Finish a stream: close its generator (its cleanup runs) and give the turn back. Kept outside
    the class so that the finalizer does not hold the stream alive."""
    try:
        gen.close()
    finally:
        if hold is not None:
            hold.release()
