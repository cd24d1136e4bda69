"""Generation: each sampled token becomes text, the reasoning is split from the answer as the text
arrives, `Piece`s are streamed and the `Answer` returned (docs/reference-model.md §6.3).

`Generation` is one answer's state, fed one sampled token at a time; whoever decodes drives it:
`generate()` below for one conversation (sample, feed, decode, repeat), and runtime/batch.py for
several sequences advanced by one batched llama_decode per step.
"""

from __future__ import annotations

import codecs
import time
from typing import Generator

from minicpmv.schema import THINK_END, THINK_START

from .kv_cache import KVContents
from .llama import LlamaModel
from .llama_context import LlamaContext
from .results import Answer, ChatStats, Piece
from .sampler import Sampler, SamplingParams


class StopStrings:
    """Ends the answer before the first of `stops` it contains (API clients' `stop`). Text that may
    be the start of a stop string is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # the answer so far, what was released and what is held back
        self.released = 0  # characters of `text` given out

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that may be given out now, whether a stop string was reached)."""
        self.text += piece
        if not self.stops:
            out, self.released = self.text[self.released :], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, max(0, self.released - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.released : end] if end > self.released else ""
            self.text, self.released = self.text[:end], end
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.released, len(self.text) - hold)
        out, self.released = self.text[self.released : end], end
        return out, False

    def flush(self) -> str:
        out, self.released = self.text[self.released :], len(self.text)
        return out


class Generation:
    """One answer, token by token. `opening()` gives the pieces shown before any token; `feed(tok)`
    takes each sampled token and returns the pieces it makes visible; `done` turns True at a stop
    token, a stop string or the end of the context (`finish_reason` says which), and then the fed
    token is not decoded. The caller decodes every other fed token and stops after
    `max_new_tokens` of them (finish_reason "length"); `close()` and `answer()` end it."""

    def __init__(
        self,
        lm: LlamaModel,
        *,
        max_new_tokens: int,
        thinking: bool,
        show_thinking: bool,
        stop_ids: frozenset[int],
        think_end: int | None,
        stats: ChatStats,
        t_start: float,
        room: int,
        stop: tuple[str, ...] = (),
    ):
        """`room`: positions left in the context after the prompt (the context's end stops it)."""
        self.lm, self.stats, self.t_start = lm, stats, t_start
        self.max_new_tokens, self.thinking, self.show_thinking = max_new_tokens, thinking, show_thinking
        self.stop_ids, self.think_end, self.room = stop_ids, think_end, room
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.in_think = thinking
        self.think_parts: list[str] = []
        self.answer_parts: list[str] = []
        self.tokens: list[int] = []
        self.lead = True  # strip the newlines that open the answer (template: lstrip after </think>)
        self.stop_text = StopStrings(stop)
        self.stopped = False  # by a stop string
        self.done = False  # a stop token, a stop string or the context's end; max_new_tokens is the caller's
        stats.finish_reason = "length"
        self.t0 = time.perf_counter()

    def opening(self) -> list[Piece]:
        if self.thinking and self.show_thinking:
            return [Piece(THINK_START + "\n", True)]  # the prompt opened the block, as the reference's stream
        return []

    def feed(self, tok: int) -> list[Piece]:
        out: list[Piece] = []
        if not self.tokens:
            self.stats.ttft_ms = (time.perf_counter() - self.t_start) * 1e3
        if tok in self.stop_ids or self.lm.is_eog(tok):
            self.stats.finish_reason = "stop"
            self.done = True
            return out
        self.tokens.append(tok)
        if self.in_think and tok == self.think_end:
            self.in_think = False
            text = self.utf8.decode(b"", final=True)
            self.think_parts.append(text)
            if self.show_thinking:
                out.append(Piece(text + THINK_END, True))
        else:
            text = self.utf8.decode(self.lm.piece(tok))
            if self.in_think:
                self.think_parts.append(text)
                if self.show_thinking and text:
                    out.append(Piece(text, True))
            else:
                if self.lead and self.thinking:  # "\n\n" after </think>: part of the block's format
                    body = text.lstrip("\n")
                    if self.show_thinking and len(body) < len(text):
                        out.append(Piece(text[: len(text) - len(body)], True))
                    text = body
                if text:
                    self.lead = False
                    text, self.stopped = self.stop_text.feed(text)
                    if text:
                        self.answer_parts.append(text)
                        out.append(Piece(text, False))
                    if self.stopped:
                        self.stats.finish_reason = "stop"
                        self.done = True
                        return out
        if len(self.tokens) > self.room:
            self.stats.finish_reason = "context"
            self.done = True
        return out

    def close(self) -> list[Piece]:
        """The text still held (an unfinished UTF-8 sequence, a possible stop string's start)."""
        self.stats.decode_tokens = len(self.tokens)
        self.stats.decode_ms = (time.perf_counter() - self.t0) * 1e3
        if self.stopped:
            return []
        tail = self.utf8.decode(b"", final=True)
        if self.in_think:
            if tail:
                self.think_parts.append(tail)
                return [Piece(tail, True)] if self.show_thinking else []
            return []
        tail, self.stopped = self.stop_text.feed(tail)
        tail += "" if self.stopped else self.stop_text.flush()
        if tail:
            self.answer_parts.append(tail)
            return [Piece(tail, False)]
        return []

    def answer(self) -> Answer:
        generated = self.lm.detokenize(self.tokens)
        head = THINK_START + "\n" if self.thinking else ""
        body = _cut_raw(generated, "".join(self.answer_parts)) if self.stopped else generated
        raw = head + body.strip()  # the reference's return value
        thinking = "".join(self.think_parts).strip()
        if self.thinking and self.think_end is not None and self.think_end not in self.tokens:
            return Answer("", thinking, raw, self.stats, self.tokens)  # unfinished reasoning: no answer yet
        return Answer("".join(self.answer_parts).strip(), thinking, raw, self.stats, self.tokens)


def generate(
    ctx: LlamaContext,
    lm: LlamaModel,
    kv: KVContents,
    sp: SamplingParams,
    *,
    max_new_tokens: int,
    thinking: bool,
    show_thinking: bool,
    stop_ids: frozenset[int],
    think_end: int | None,
    stats: ChatStats,
    t_start: float,
    stop: tuple[str, ...] = (),
) -> Generator[Piece, None, Answer]:
    """Sample and decode until the answer is done (see Generation); yields Pieces, returns the
    Answer. `kv` is the cache contents this turn was prefilled into (generated tokens are appended
    to it). The caller holds the model's turn (runtime/turn.py) whenever it resumes this generator."""
    sampler = Sampler(lm.n_vocab, sp)
    pos = len(kv)
    g = Generation(
        lm,
        max_new_tokens=max_new_tokens,
        thinking=thinking,
        show_thinking=show_thinking,
        stop_ids=stop_ids,
        think_end=think_end,
        stats=stats,
        t_start=t_start,
        room=ctx.n_ctx - pos,
        stop=stop,
    )
    closed = False
    try:
        yield from g.opening()
        for _ in range(max_new_tokens):
            tok = sampler.sample(ctx)
            yield from g.feed(tok)
            if g.done:
                break
            ctx.decode_one(tok, pos)
            kv.append_token(tok)
            pos += 1
        closed = True
        yield from g.close()
    finally:
        sampler.close()
        if not closed:  # ended early (the stream was closed): the counters still land
            g.stats.decode_tokens = len(g.tokens)
            g.stats.decode_ms = (time.perf_counter() - g.t0) * 1e3
    return g.answer()


def _cut_raw(generated: str, answer: str) -> str:
    """The generated text up to the end of the answer kept before a stop string."""
    i = generated.rfind(answer) if answer else -1
    if i < 0:
        i = generated.find(THINK_END)
        return generated[: i + len(THINK_END)] if i >= 0 else ""
    return generated[: i + len(answer)]
