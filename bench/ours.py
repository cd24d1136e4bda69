"""Our side of every comparison, through the project's public API only.

Kept in one place so that the benchmark follows the runtime's API as it is, and so that a missing
module becomes one "not run: ..." line instead of a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .common import Skip


def need(module: str, attr: str | None = None):
    """Import `minicpmv.<module>` (and an attribute of it) or raise Skip naming what is missing."""
    import importlib

    try:
        mod = importlib.import_module(f"minicpmv.{module}")
    except ImportError as e:
        raise Skip(f"minicpmv.{module} is not available ({e})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Skip(f"minicpmv.{module}.{attr} is not available")
    return getattr(mod, attr)


@dataclass
class ChatTiming:
    ttft_s: float  # call -> first streamed piece
    total_s: float  # call -> generator exhausted
    n_pieces: int
    counters: dict = field(default_factory=dict)  # the runtime's own timing counters, if any


def runtime_counters(model) -> dict:
    """The runtime's counters of the last chat() turn (`MiniCPMV.stats`, a ChatStats), flattened
    to JSON scalars; the per-slot vision times are summed into vision_ms_total."""
    st = getattr(model, "stats", None)
    if st is None:
        return {}
    d = st.as_dict() if hasattr(st, "as_dict") else dict(vars(st))
    vis = d.pop("vision_ms", None)
    if isinstance(vis, list):
        d["vision_ms_total"] = float(sum(vis))
        d["vision_slots"] = len(vis)
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def timed_chat(model, msgs, **kw) -> ChatTiming:
    t0 = time.perf_counter()
    ttft = None
    n = 0
    for _piece in model.chat(msgs, stream=True, **kw):
        if ttft is None:
            ttft = time.perf_counter() - t0
        n += 1
    total = time.perf_counter() - t0
    counters = runtime_counters(model)
    if counters.get("ttft_ms"):
        # the runtime's own: chat() call -> first sampled token (a streamed piece can lag behind
        # it when the first token is an incomplete UTF-8 sequence)
        ttft = counters["ttft_ms"] / 1e3
    return ChatTiming(ttft if ttft is not None else total, total, n, counters)


def reset(model) -> None:
    """Forget the KV cache and the image-encoding cache between measured runs, if the runtime
    offers a way (the benchmark also changes one pixel per run so content hashes differ)."""
    for name in ("reset", "clear", "reset_cache"):
        f = getattr(model, name, None)
        if callable(f):
            f()
            return
