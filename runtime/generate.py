"""Generation: sample and decode one token at a time, split the reasoning from the answer as the
text arrives, stream `Piece`s and return the `Answer` (docs/reference-model.md §6.3)."""

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
    """Sample and decode until a stop token (or, in the answer, one of the `stop` strings, which is
    left out); yields Pieces, returns the Answer. `kv` is the cache contents this turn was
    prefilled into (generated tokens are appended to it). The caller holds the model's turn
    (runtime/turn.py) whenever it resumes this generator."""
    sampler = Sampler(lm.n_vocab, sp)
    stops, is_eog, piece = stop_ids, lm.is_eog, lm.piece
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    n_ctx = ctx.n_ctx
    pos = len(kv)
    in_think = thinking
    think_parts: list[str] = []
    answer_parts: list[str] = []
    tokens: list[int] = []
    lead = True  # strip the newlines that open the answer (template: lstrip after </think>)
    stop_text = StopStrings(stop)
    stopped = False
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
                            yield Piece(text[: len(text) - len(body)], True)
                        text = body
                    if text:
                        lead = False
                        text, stopped = stop_text.feed(text)
                        if text:
                            answer_parts.append(text)
                            yield Piece(text, False)
                        if stopped:
                            stats.finish_reason = "stop"
                            break
            if pos >= n_ctx:
                stats.finish_reason = "context"
                break
            ctx.decode_one(tok, pos)
            kv.append_token(tok)
            pos += 1
        tail = "" if stopped else utf8.decode(b"", final=True)
        if in_think:
            if tail:
                think_parts.append(tail)
                if show_thinking:
                    yield Piece(tail, True)
        elif not stopped:
            tail, stopped = stop_text.feed(tail)
            tail += "" if stopped else stop_text.flush()
            if tail:
                answer_parts.append(tail)
                yield Piece(tail, False)
    finally:
        sampler.close()
        stats.decode_tokens = len(tokens)
        stats.decode_ms = (time.perf_counter() - t0) * 1e3
    generated = lm.detokenize(tokens)
    raw = (THINK_START + "\n" if thinking else "") + generated.strip()  # the reference's return value
    if stopped:
        raw = (THINK_START + "\n" if thinking else "") + _cut_raw(generated, "".join(answer_parts)).strip()
    if thinking and think_end is not None and think_end not in tokens:
        # unfinished reasoning (length limit): everything is thinking, no answer yet
        return Answer("", "".join(think_parts).strip(), raw, stats, tokens)
    return Answer("".join(answer_parts).strip(), "".join(think_parts).strip(), raw, stats, tokens)


def _cut_raw(generated: str, answer: str) -> str:
    """The generated text up to the end of the answer kept before a stop string."""
    i = generated.rfind(answer) if answer else -1
    if i < 0:
        i = generated.find(THINK_END)
        return generated[: i + len(THINK_END)] if i >= 0 else ""
    return generated[: i + len(answer)]
