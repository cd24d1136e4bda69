"""What the language model's KV cache holds, as named runs, and how a prompt is decoded into it.

A `Sequence` is the cache's contents position by position, grouped in runs: `TextRun`s of token ids
and `SlotRun`s of one image slot's embedding rows, named by the media item's content key and the
slot's index. A new turn keeps the longest common prefix with what is decoded (`common_prefix`,
never ending inside a slot) and decodes the rest in `Step`s: text runs as token batches, slots as
embedding batches; a short text run touching a slot (the "<image>", "</image><slice>", ... tokens of
a placeholder) goes along as its token_embd rows, so a whole image is one embedding batch instead of
one decode call per text run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .llama import LlamaContext, TokenEmbeddings
from .results import ChatStats

FUSE_MAX_TEXT = 16   # text runs up to this long next to a slot are decoded as embedding rows


@dataclass
class TextRun:
    tokens: list[int]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class SlotRun:
    media: bytes      # content key of the media item (vision_cache.media_key)
    index: int        # 0: the overview, 1..: the slices
    rows: int         # embedding rows (the resampler's query_num)

    def __len__(self) -> int:
        return self.rows


Run = TextRun | SlotRun


@dataclass
class Sequence:
    """Cache contents: runs of text and slots, adjacent text runs merged."""
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        runs, self.runs, self.length = self.runs, [], 0
        for r in runs:
            self.add(r)

    def __len__(self) -> int:
        return self.length

    def add(self, run: Run) -> None:
        if not len(run):
            return
        if isinstance(run, TextRun) and self.runs and isinstance(self.runs[-1], TextRun):
            self.runs[-1].tokens += run.tokens
        else:
            self.runs.append(TextRun(list(run.tokens)) if isinstance(run, TextRun) else run)
        self.length += len(run)

    def append_token(self, token: int) -> None:
        """One generated token (decoded at position len(self))."""
        self.add(TextRun([token]))

    def slots(self) -> list[tuple[int, SlotRun]]:
        """(start position, slot) of every slot."""
        out, pos = [], 0
        for r in self.runs:
            if isinstance(r, SlotRun):
                out.append((pos, r))
            pos += len(r)
        return out

    def common_prefix(self, new: "Sequence", limit: int) -> int:
        """Positions at the start of `new` that this sequence already holds, at most `limit`, never
        ending inside a slot (a slot is reused whole or decoded whole)."""
        pos = 0
        for a, b in zip(self.runs, new.runs):
            if isinstance(a, TextRun) and isinstance(b, TextRun):
                n = 0
                for x, y in zip(a.tokens, b.tokens):
                    if x != y or pos + n >= limit:
                        break
                    n += 1
                pos += n
                if n < len(a) or n < len(b):
                    break
            elif a == b and pos + len(a) <= limit:
                pos += len(a)
            else:
                break
        return pos

    def prefix(self, n: int) -> "Sequence":
        """The first n positions (n must not fall inside a slot)."""
        out, pos = Sequence(), 0
        for r in self.runs:
            if pos + len(r) <= n:
                out.add(TextRun(list(r.tokens)) if isinstance(r, TextRun) else r)
            elif pos < n:
                if isinstance(r, SlotRun):
                    raise ValueError(f"position {n} falls inside a slot")
                out.add(TextRun(r.tokens[:n - pos]))
            pos += len(r)
        return out


@dataclass
class Part:
    """Positions [start, start + hi - lo) of the sequence: items lo..hi of one run."""
    run: Run
    lo: int
    hi: int
    start: int


@dataclass
class Step:
    """One kind of decode call over consecutive positions: token batches, or embedding rows."""
    embeddings: bool
    parts: list[Part]

    @property
    def start(self) -> int:
        return self.parts[0].start

    @property
    def end(self) -> int:
        return self.parts[-1].start + self.parts[-1].hi - self.parts[-1].lo


def plan_steps(seq: Sequence, start: int, fuse: bool) -> list[Step]:
    """Decode steps for positions start..len(seq). With `fuse`, a text run of at most FUSE_MAX_TEXT
    tokens next to a slot joins the slots' embedding step."""
    parts, pos = [], 0
    for r in seq.runs:
        if pos + len(r) > start:
            lo = max(0, start - pos)
            parts.append(Part(r, lo, len(r), pos + lo))
        pos += len(r)

    def as_embeddings(i: int) -> bool:
        p = parts[i]
        if isinstance(p.run, SlotRun):
            return True
        near_slot = any(0 <= j < len(parts) and isinstance(parts[j].run, SlotRun) for j in (i - 1, i + 1))
        return fuse and near_slot and p.hi - p.lo <= FUSE_MAX_TEXT

    steps: list[Step] = []
    for i, p in enumerate(parts):
        emb = as_embeddings(i)
        if steps and emb and steps[-1].embeddings:
            steps[-1].parts.append(p)
        else:
            steps.append(Step(emb, [p]))
    return steps


def _rows(parts: list[Part], s: int, e: int, embs: dict[bytes, np.ndarray], tok_embd: TokenEmbeddings,
          n_embd: int) -> np.ndarray:
    """Embedding rows for positions s..e: slot rows from the vision output, tokens from token_embd."""
    out = np.empty((e - s, n_embd), dtype=np.float32)
    for p in parts:
        a, b = max(s, p.start), min(e, p.start + p.hi - p.lo)
        if a >= b:
            continue
        lo, hi = p.lo + a - p.start, p.lo + b - p.start
        if isinstance(p.run, SlotRun):
            out[a - s:b - s] = embs[p.run.media][p.run.index][lo:hi]
        else:
            out[a - s:b - s] = tok_embd.rows(p.run.tokens[lo:hi])
    return out


def decode(ctx: LlamaContext, steps: list[Step], n: int, embs: dict[bytes, np.ndarray],
           tok_embd: TokenEmbeddings, stats: ChatStats) -> None:
    """Run the steps; logits only for position n - 1. Embedding rows are built one batch at a time
    (bounded memory)."""
    cap = ctx.embd_capacity
    for step in steps:
        if not step.embeddings:
            tokens = [t for p in step.parts for t in p.run.tokens[p.lo:p.hi]]
            ctx.decode_tokens(tokens, step.start, logits_last=step.end == n)
            continue
        for c in range(step.start, step.end, cap):
            ce = min(step.end, c + cap)
            ctx.decode_embd(_rows(step.parts, c, ce, embs, tok_embd, ctx.model.n_embd), c, logits_last=ce == n)
        stats.slots_prefilled += sum(1 for p in step.parts if isinstance(p.run, SlotRun) and p.lo == 0)
