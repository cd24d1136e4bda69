"""Generation: sample and decode one token at a time, split the reasoning from the answer as the
text arrives, stream `Piece`s and return the `Answer` (docs/reference-model.md §6.3)."""

from __future__ import annotations

import codecs
import time
from typing import Generator

from minicpmv.schema import THINK_END, THINK_START

from .kv_cache import Sequence
from .llama import LlamaModel
from .llama_context import LlamaContext
from .sampler import Sampler, SamplingParams
from .results import Answer, ChatStats, Piece


def generate(ctx: LlamaContext, lm: LlamaModel, kv: Sequence, sp: SamplingParams, *, max_new_tokens: int,
             thinking: bool, show_thinking: bool, stop_ids: frozenset[int], think_end: int | None,
             stats: ChatStats, t_start: float) -> Generator[Piece, None, Answer]:
    """Sample and decode until a stop token; yields Pieces, returns the Answer. `kv` is the cache
    contents this turn was prefilled into (generated tokens are appended to it). The caller holds the
    model's turn (runtime/turn.py) whenever it resumes this generator."""
    sampler = Sampler(lm.n_vocab, sp)
    stops, is_eog, piece = stop_ids, lm.is_eog, lm.piece
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
            ctx.decode_one(tok, pos)
            kv.append_token(tok)
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
