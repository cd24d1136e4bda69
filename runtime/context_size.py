"""How many positions the language model's context holds: sized for the turn, grown with the conversation.

llama.cpp allocates a context's KV cache for n_ctx positions when the context is created and cannot
resize it. Unless the caller fixes n_ctx (`MiniCPMV.load(n_ctx=N)`, `--ctx N`), `GrowingContext`
creates the context at the first prefill, sized for what that turn needs (prompt + tokens to
generate, rounded up), so a loaded model holds no KV cache yet and a short question does not pay for
a long conversation's cache. When a later turn needs more, it copies the KV cache's kept prefix out
(llama_state_seq_get_data), frees the old context, creates a larger one and puts the prefix back
(llama_state_seq_set_data): peak memory is the copied prefix plus the new cache, never two caches,
and only the new part of the prompt is decoded. If llama.cpp refuses the copy, the whole prompt is
decoded again. The context never shrinks, and never exceeds the model's trained context
(`<arch>.context_length`, 40,960 for MiniCPM-V 4.5): a prompt longer than that is an error, and
generation that reaches it ends with finish_reason "context".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import gguf

from minicpmv.gguf_info import row_size

from .llama import KVShape, LlamaModel
from .llama_backend import ContextOverflowError
from .llama_context import ContextParams, LlamaContext
from .results import ChatStats

# Sizes are multiples of 512: the default n_batch, so a small context never shrinks the batch
# (llama.cpp caps n_batch at n_ctx, and batching changes the f16 logits); a multiple of the 256
# positions llama.cpp pads n_ctx and its attention window to, so a context sized here attends over
# exactly the cells a larger one would (greedy answers do not depend on the size); and at most 511
# unused positions, 72 MiB of f16 KV cache on the 8B model.
GRANULE = 512
GROWTH = 1.5  # a grown context is at least 1.5x the old one: a long chat copies its cache O(log n) times


def context_size(needed: int, limit: int, current: int = 0, *, granule: int = GRANULE, growth: float = GROWTH) -> int:
    """n_ctx for a turn that needs `needed` positions (prompt + tokens to generate) when the context
    holds `current` (0: none yet): `current` if that is enough (or cannot grow), else `needed` and
    at least `growth` x `current`, rounded up to `granule`, and at most `limit`."""
    if needed <= current or (current and current >= limit):
        return current
    target = max(needed, math.ceil(current * growth))
    return min(limit, -(-target // granule) * granule)


def kv_cache_bytes(n_ctx: int, shape: KVShape, kv_type: str) -> int:
    """Bytes of a KV cache of n_ctx positions (K and V of every layer, in GGML type `kv_type`)."""
    t = gguf.GGMLQuantizationType[kv_type.upper()]
    per_layer = row_size(t, shape.n_head_kv * shape.head_dim_k) + row_size(t, shape.n_head_kv * shape.head_dim_v)
    return n_ctx * shape.n_layer * per_layer


@dataclass(frozen=True)
class ContextChange:
    """A context was created (or, `previous` > 0, replaced by a larger one)."""

    n_ctx: int
    kv_bytes: int
    previous: int = 0  # n_ctx of the context it replaced
    kept: int = 0  # KV positions copied over from it
    fixed: bool = False  # sized by the caller (n_ctx / --ctx)

    def __str__(self) -> str:
        if self.fixed:
            how = "fixed by --ctx / n_ctx"
        elif self.previous:
            how = f"grown from {self.previous}, {self.kept} cached positions kept"
        else:
            how = "sized for the turn"
        return f"context: {self.n_ctx} tokens, KV cache {self.kv_bytes / 2**20:.1f} MiB ({how})"


class GrowingContext:
    """The conversation's llama.cpp context: a fixed one given by the caller, or one created and
    grown as turns need (see the module docstring). `ctx` is None until the first prefill."""

    def __init__(
        self, lm: LlamaModel, params: ContextParams, fixed: LlamaContext | None = None, fixed_size: int | None = None
    ):
        """`fixed`: a context made by the caller; `fixed_size`: a size fixed by the caller, the
        context made at the first prefill (after that turn's images are encoded, so the vision
        encoder's working memory and the KV cache are not resident at the same time on a first
        turn); neither: sized and grown per turn."""
        self.lm, self.params = lm, params
        self.ctx = fixed
        self.fixed = fixed is not None or fixed_size is not None
        self.limit = fixed.n_ctx if fixed is not None else fixed_size or lm.n_ctx_train
        self._shape = lm.kv_shape()
        self.last: ContextChange | None = (
            ContextChange(fixed.n_ctx, self.kv_bytes(fixed.n_ctx), fixed=True) if fixed is not None else None
        )
        self._watch: Callable[[ContextChange], None] | None = None

    def kv_bytes(self, n_ctx: int) -> int:
        return kv_cache_bytes(n_ctx, self._shape, self.params.kv_type)

    def watch(self, fn: Callable[[ContextChange], None] | None) -> None:
        """Call fn with every later ContextChange, and now with the current context's, if any."""
        self._watch = fn
        if fn is not None and self.last is not None:
            fn(self.last)

    def check_prompt(self, n: int, parts: str) -> None:
        """ContextOverflowError (one line) unless a prompt of n positions leaves room for one more."""
        if n + 1 <= self.limit:
            return
        if self.fixed:
            room = f"the context holds n_ctx={self.limit}; raise n_ctx (--ctx)"
        else:
            room = f"the model's trained context holds {self.limit} (n_ctx_train); start a new conversation"
        raise ContextOverflowError(
            f"the prompt needs {n} tokens ({parts}) plus room to answer, but {room} "
            "or use fewer images/slices (--max-slices)"
        )

    def make_room(self, needed: int, keep: int, stats: ChatStats) -> int:
        """Make the context hold `needed` positions (up to the limit), keeping the first `keep`
        positions it holds; returns how many it still holds (`keep`, or 0 if a copy failed).
        A failed context creation leaves no context (the next call creates one) and raises LlamaError."""
        current = self.ctx.n_ctx if self.ctx is not None else 0
        if self.fixed:
            size = current or self.limit
        else:
            size = context_size(needed, self.limit, current)
        if size != current:
            keep = self._replace(size, keep if current else 0, stats)
        stats.n_ctx = self.ctx.n_ctx
        return keep

    def _replace(self, size: int, keep: int, stats: ChatStats) -> int:
        old, self.ctx = self.ctx, None
        state = old.seq_state() if old is not None and keep else None
        if old is not None:
            old.close()  # before the new cache is allocated: never two caches at once
        ctx = LlamaContext(self.lm, dataclasses.replace(self.params, n_ctx=size))
        kept = keep if state is not None and ctx.load_seq_state(state) else 0
        del state
        self.ctx = ctx
        if old is not None:
            stats.ctx_grows += 1
            stats.tokens_kept = kept
        self.last = ContextChange(
            ctx.n_ctx, self.kv_bytes(ctx.n_ctx), old.n_ctx if old is not None else 0, kept, fixed=self.fixed
        )
        if self._watch is not None:
            self._watch(self.last)
        return kept

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
