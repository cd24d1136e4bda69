"""What the language model's KV cache holds, as named runs, and how a prompt is decoded into it.

A `KVContents` is the cache's contents position by position, grouped in runs: `TextRun`s of token ids
and `SlotRun`s of one image slot's embedding rows, named by the media item's content key and the
slot's index. A new turn keeps the longest common prefix with what is decoded (`common_prefix`,
never ending inside a slot) and decodes the rest in `Step`s: text runs as token batches, slots as
embedding batches; a text run touching a slot (the "<image>", "</image><slice>", ... tokens of a
placeholder, and the question after the image) goes along as its token_embd rows, so a whole image
and the text around it are one embedding batch instead of one decode call per text run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .llama_context import LlamaContext
from .results import ChatStats
from .token_embeddings import TokenEmbeddings


@dataclass
class TextRun:
    tokens: list[int]
    is_slot: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.tokens)

    def shared(self, other: "Run", limit: int) -> int:
        """Leading positions equal in `other` (at most `limit`)."""
        if other.is_slot:
            return 0
        n = 0
        for x, y in zip(self.tokens, other.tokens):
            if x != y or n >= limit:
                break
            n += 1
        return n

    def head(self, n: int) -> "TextRun":
        return TextRun(self.tokens[:n])

    def rows(self, lo: int, hi: int, embs: dict[bytes, np.ndarray], tok_embd: TokenEmbeddings) -> np.ndarray:
        return tok_embd.rows(self.tokens[lo:hi])


@dataclass(frozen=True)
class SlotRun:
    media_key: bytes  # content key of the media item (vision_cache.media_key)
    index: int  # 0: the overview, 1..: the slices
    size: int  # embedding rows (the resampler's query_num)
    is_slot: ClassVar[bool] = True

    def __len__(self) -> int:
        return self.size

    def shared(self, other: "Run", limit: int) -> int:
        """A slot is shared whole (the same media item and slot) or not at all."""
        return self.size if other == self and self.size <= limit else 0

    def head(self, n: int) -> "SlotRun":
        if n != self.size:
            raise ValueError(f"a cache prefix cannot end inside a slot ({n} of {self.size} rows)")
        return self

    def rows(self, lo: int, hi: int, embs: dict[bytes, np.ndarray], tok_embd: TokenEmbeddings) -> np.ndarray:
        return embs[self.media_key][self.index][lo:hi]


Run = TextRun | SlotRun


@dataclass
class KVContents:
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
        if not run.is_slot and self.runs and not self.runs[-1].is_slot:
            self.runs[-1].tokens += run.tokens
        else:
            self.runs.append(run if run.is_slot else TextRun(list(run.tokens)))
        self.length += len(run)

    def append_token(self, token: int) -> None:
        """One generated token (decoded at position len(self))."""
        self.add(TextRun([token]))

    def slots(self) -> list[tuple[int, SlotRun]]:
        """(start position, slot) of every slot."""
        out, pos = [], 0
        for r in self.runs:
            if r.is_slot:
                out.append((pos, r))
            pos += len(r)
        return out

    def common_prefix(self, new: "KVContents", limit: int) -> int:
        """Positions at the start of `new` that this sequence already holds, at most `limit`, never
        ending inside a slot (a slot is reused whole or decoded whole)."""
        pos = 0
        for a, b in zip(self.runs, new.runs):
            n = a.shared(b, limit - pos)
            pos += n
            if n < len(a) or n < len(b):
                break
        return pos

    def prefix(self, n: int) -> "KVContents":
        """The first n positions (n must not fall inside a slot)."""
        out, pos = KVContents(), 0
        for r in self.runs:
            if pos >= n:
                break
            out.add(r.head(min(len(r), n - pos)))
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


def plan_steps(seq: KVContents, start: int, fuse: bool) -> list[Step]:
    """Decode steps for positions start..len(seq). With `fuse`, a text run next to a slot joins the
    slots' embedding step, whatever its length: each llama_decode call reads every weight once, so a
    separate token batch for the question after an image costs a pass over the weights that the
    embedding batch does not, while the rows cost little to dequantize (docs/architecture.md §3,
    step 6)."""
    parts, pos = [], 0
    for r in seq.runs:
        if pos + len(r) > start:
            lo = max(0, start - pos)
            parts.append(Part(r, lo, len(r), pos + lo))
        pos += len(r)

    def as_embeddings(i: int) -> bool:
        p = parts[i]
        if p.run.is_slot:
            return True
        near_slot = any(0 <= j < len(parts) and parts[j].run.is_slot for j in (i - 1, i + 1))
        return fuse and near_slot

    steps: list[Step] = []
    for i, p in enumerate(parts):
        emb = as_embeddings(i)
        if steps and emb and steps[-1].embeddings:
            steps[-1].parts.append(p)
        else:
            steps.append(Step(emb, [p]))
    return steps


def step_rows(
    parts: list[Part], s: int, e: int, embs: dict[bytes, np.ndarray], tok_embd: TokenEmbeddings, n_embd: int
) -> np.ndarray:
    """Embedding rows for positions s..e: slot rows from the vision output, tokens from token_embd."""
    out = np.empty((e - s, n_embd), dtype=np.float32)
    for p in parts:
        a, b = max(s, p.start), min(e, p.start + p.hi - p.lo)
        if a >= b:
            continue
        out[a - s : b - s] = p.run.rows(p.lo + a - p.start, p.lo + b - p.start, embs, tok_embd)
    return out


def decode(
    ctx: LlamaContext,
    steps: list[Step],
    n: int,
    embs: dict[bytes, np.ndarray],
    tok_embd: TokenEmbeddings,
    stats: ChatStats,
) -> None:
    """Run the steps; logits only for position n - 1. Embedding rows are built one batch at a time
    (bounded memory)."""
    cap = ctx.embd_capacity
    for step in steps:
        if not step.embeddings:
            tokens = [t for p in step.parts for t in p.run.tokens[p.lo : p.hi]]
            ctx.decode_tokens(tokens, step.start, logits_last=step.end == n)
            continue
        for c in range(step.start, step.end, cap):
            ce = min(step.end, c + cap)
            ctx.decode_embd(step_rows(step.parts, c, ce, embs, tok_embd, ctx.model.n_embd), c, logits_last=ce == n)
        stats.slots_prefilled += sum(1 for p in step.parts if p.run.is_slot and p.lo == 0)


def chunk_steps(steps: list[Step], size: int) -> list[tuple[bool, list[Part]]]:
    """The steps cut into pieces of at most `size` positions, as (embeddings?, parts): a prefill fed
    between other sequences' tokens (runtime/batch.py). A piece may end inside a slot's rows."""
    out = []
    for step in steps:
        cur, n = [], 0
        for p in step.parts:
            lo = p.lo
            while lo < p.hi:
                take = min(p.hi - lo, size - n)
                cur.append(Part(p.run, lo, lo + take, p.start + lo - p.lo))
                lo += take
                n += take
                if n == size:
                    out.append((step.embeddings, cur))
                    cur, n = [], 0
        if cur:
            out.append((step.embeddings, cur))
    return out
