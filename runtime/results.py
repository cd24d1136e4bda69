"""What a chat() turn returns: the answer (a str with its reasoning and counters attached), the
streamed pieces, and the turn's counters and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator


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
    n_ctx: int = 0                  # positions the context held this turn (context_size.py)
    ctx_grows: int = 0              # 1 if this turn replaced the context by a larger one
    tokens_kept: int = 0            # KV positions copied into the larger context (not decoded again)

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
    `on_result`, if given)."""

    def __init__(self, gen: Generator[Piece, None, Answer], on_result: Callable[[Answer], None] | None = None):
        self.result: Answer | None = None
        self._gen = self._run(gen, on_result)

    def _run(self, gen: Generator[Piece, None, Answer], on_result) -> Iterator[Piece]:
        self.result = yield from gen
        if on_result is not None:
            on_result(self.result)

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> Piece:
        return next(self._gen)
