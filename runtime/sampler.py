"""Sampling the next token in the reference's (transformers') order, on a llama.cpp sampler chain."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp as ll
import numpy as np

from minicpmv.schema import REFERENCE_SAMPLING, THINKING_SAMPLING

from .llama_backend import release
from .llama_context import LlamaContext

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


@dataclass
class SamplingParams:
    temperature: float = REFERENCE_SAMPLING.temperature
    top_p: float = REFERENCE_SAMPLING.top_p
    top_k: int = REFERENCE_SAMPLING.top_k
    repetition_penalty: float = REFERENCE_SAMPLING.repetition_penalty
    seed: int | None = None
    greedy: bool = False


class Sampler:
    """Sampling in the reference's (transformers') order:
    repetition penalty -> top-k -> temperature -> top-p -> random pick.

    transformers applies temperature before top-k and top-p; top-k does not depend on the
    temperature, top-p does, so the temperature goes between them. `greedy` keeps the penalty and
    takes the argmax.

    The repetition penalty is applied here, in place on llama.cpp's logits row, to the tokens
    generated so far (transformers penalises the generated ids when generating from input
    embeddings: divide positive logits, multiply negative ones). llama.cpp's penalties sampler
    does the same but visits every vocabulary entry (151k) per token; this visits only the
    distinct generated ids. The rest is one llama.cpp sampler chain.
    """

    def __init__(self, n_vocab: int, params: SamplingParams):
        self.chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda s: ll.llama_sampler_chain_add(self.chain, s)  # noqa: E731 (chain owns s)
        p = params
        self.n_vocab = n_vocab
        self.penalty = float(p.repetition_penalty)
        if self.penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.penalty}")
        self._track = self.penalty != 1.0  # the generated ids matter only for the penalty
        self._seen: set[int] = set()
        self._seen_ids = np.zeros(64, dtype=np.int64)
        if p.greedy or p.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
        else:
            if p.top_k and p.top_k > 0:
                add(ll.llama_sampler_init_top_k(p.top_k))
            add(ll.llama_sampler_init_temp(p.temperature))
            if p.top_p < 1.0:
                add(ll.llama_sampler_init_top_p(p.top_p, 1))
            add(ll.llama_sampler_init_dist(LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF))

    def sample(self, ctx: LlamaContext, idx: int = -1) -> int:
        """Sample the next token from the logits of output `idx` of the last batch (-1: its last),
        and remember it for the penalty."""
        n = len(self._seen)
        if n:
            row = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
            ids = self._seen_ids[:n]
            v = row[ids]
            row[ids] = np.where(v < 0, v * self.penalty, v / self.penalty)
        tok = ll.llama_sampler_sample(self.chain, ctx.ctx, idx)
        if self._track and tok not in self._seen:
            if n == len(self._seen_ids):
                self._seen_ids = np.concatenate([self._seen_ids, np.zeros_like(self._seen_ids)])
            self._seen_ids[n] = tok
            self._seen.add(tok)
        return tok

    def close(self) -> None:
        release(self, "chain", ll.llama_sampler_free)

    def __del__(self):
        self.close()


def sampling_params(
    enable_thinking: bool,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    greedy: bool = False,
) -> SamplingParams:
    """chat()'s sampling: unset values are the reference's (schema.REFERENCE_SAMPLING), or with
    thinking the transformers defaults its inner model falls back to (schema.THINKING_SAMPLING)."""
    d = THINKING_SAMPLING if enable_thinking else REFERENCE_SAMPLING
    return SamplingParams(
        temperature=d.temperature if temperature is None else temperature,
        top_p=d.top_p if top_p is None else top_p,
        top_k=d.top_k if top_k is None else top_k,
        repetition_penalty=d.repetition_penalty if repetition_penalty is None else repetition_penalty,
        seed=seed,
        greedy=greedy,
    )
