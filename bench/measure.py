"""What the measuring subprocesses (bench.worker) share: the repetition budget, the chat prompt of
the llama.cpp side, and the runtime counters that say how many tokens ours decoded."""

from __future__ import annotations

import time

QUESTION = "What is in the image? Describe the shapes and their colours."


def chatml(user: str) -> str:
    """The reference's prompt with thinking off (docs/reference-model.md §5.3)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class Runs:
    """Up to `runs` measured repetitions, fewer if the next one would overrun `budget_s` seconds
    (counted from the first measured run; at least one run is always made)."""

    def __init__(self, runs: int, budget_s: float | None):
        self.runs, self.budget = runs, budget_s
        self.t0 = None

    def __iter__(self):
        self.t0 = time.perf_counter()
        for r in range(self.runs):
            if r and self.budget is not None:
                spent = time.perf_counter() - self.t0
                if spent + spent / r > self.budget:
                    return
            yield r


def gen_count(counters: dict, fallback: int) -> int:
    """Tokens ours generated (the runtime's counter, else the number of streamed pieces)."""
    n = counters.get("decode_tokens")
    return n if isinstance(n, int) else fallback


def prompt_count(counters: dict) -> int | None:
    for k in ("tokens_prefilled", "prompt_tokens"):
        if isinstance(counters.get(k), int):
            return counters[k]
    return None
