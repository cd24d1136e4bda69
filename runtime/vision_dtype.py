"""Which precision the vision encoder computes in on this machine: measured, not guessed from the CPU.

bf16 halves the weights and, where the CPU has bf16 dot products that torch reaches (oneDNN on x86
with AVX512-BF16 or AMX), nearly halves the time. Elsewhere torch may run bf16 matrix products
through slow generic kernels (public reports: a bf16 `bmm` 27x slower than f32 on AWS Graviton3,
pytorch/pytorch#151934; bf16 matmuls slower than f32 on an M1 Pro, pytorch/pytorch#127477), so a CPU
name says little. `auto` therefore times the attention half of one SigLIP encoder block at slice size
(1024 patches, the real width, random weights) in both dtypes, through the encoder's own code
(`vision_ops.attention_half`, the same packed oneDNN linears or their fallback, the same attention),
with the real thread count, and keeps bf16 only if it is at least `MARGIN`
faster: f32 is the more exact one.

The result is cached per (CPU model, torch version, thread count) in the user cache folder
(`$MINICPMV_CACHE`, else `$XDG_CACHE_HOME/minicpmv` or `~/.cache/minicpmv`; `~/Library/Caches/minicpmv`
on macOS). A corrupt or stale cache is measured again, never an error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minicpmv.cpu import cpu_info, default_threads

from .vision_ops import attention_for, attention_half
from .vision_threads import torch_threads
from .vision_weights import Linear, pack_linears

MARGIN = 1.15  # bf16 is chosen when f32 time / bf16 time >= MARGIN
ROUNDS = 4  # timed runs of each dtype, taking turns
PROBE_VERSION = 2  # bump when the timed workload changes: older cache entries are stale
CACHE_FILE = "vision-dtype.json"
# SigLIP2-400M as in MiniCPM-V 4.5's mmproj (docs/reference-model.md §2): the probe's shapes.
PROBE_WIDTH, PROBE_HEADS, PROBE_TOKENS = 1152, 16, 1024
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bf16" or "f32"
    source: str  # "forced", "measured" or "cached"
    f32_ms: float | None = None  # the probe (attention half of a block), best of the timed runs
    bf16_ms: float | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """One line for --verbose and the system report."""
        if self.source == "forced":
            return f"{self.dtype} (forced)"
        return (
            f"{self.dtype} ({self.source}: half an encoder block at slice size takes {self.f32_ms:.0f} ms "
            f"in f32, {self.bf16_ms:.0f} ms in bf16; bf16 needs to be {MARGIN:.2f}x faster)"
        )


def decide(f32_ms: float, bf16_ms: float, margin: float = MARGIN) -> str:
    """ "bf16" only where it is clearly faster; equal within the margin keeps f32."""
    return "bf16" if bf16_ms > 0 and f32_ms / bf16_ms >= margin else "f32"


def user_cache_dir() -> Path:
    env = os.environ.get("MINICPMV_CACHE")
    if env:
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "minicpmv"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpmv"


def cache_key(threads: int) -> str:
    """One measurement per CPU (its name, architecture and feature flags: on aarch64 /proc/cpuinfo
    names no model, so the flags tell cores apart), torch version and thread count."""
    info = cpu_info()
    flags = info.flags_digest
    return f"{info.model} | {info.machine} | flags {flags} | torch {torch.__version__} | {threads} threads"


# --------------------------------------------------------------------------- the measurement


def measure(threads: int, rounds: int = ROUNDS) -> tuple[float, float]:
    """(f32 ms, bf16 ms) for the attention half of one encoder block (LayerNorm, fused q|k|v
    projection, self-attention, output projection: the products that decide the speed), timed by
    `time_interleaved`."""
    d, n = PROBE_WIDTH, PROBE_TOKENS
    g = torch.Generator().manual_seed(0)
    w_qkv, b_qkv = torch.randn(3 * d, d, generator=g) * 0.02, torch.zeros(3 * d)
    w_out, b_out = torch.randn(d, d, generator=g) * 0.02, torch.zeros(d)
    ln_w, ln_b = torch.ones(d), torch.zeros(d)
    x = torch.randn(n, d, generator=g)
    blocks = {}
    for name, dt in DTYPES.items():
        pack = pack_linears(dt)
        qkv, o = Linear(w_qkv, b_qkv, dt, pack=pack), Linear(w_out, b_out, dt, pack=pack)
        blocks[name] = (qkv, o, dt, attention_for(dt, PROBE_HEADS))

    def run(name: str) -> float:
        qkv, o, dt, attend = blocks[name]
        t0 = time.perf_counter()
        attention_half(x, ln_w, ln_b, qkv, o, [n], 1e-6, dt, attend)
        return (time.perf_counter() - t0) * 1e3

    with torch_threads(threads), torch.inference_mode():
        return time_interleaved(run, rounds)


def time_interleaved(run: Callable[[str], float], rounds: int) -> tuple[float, float]:
    """(f32 ms, bf16 ms): after a warm-up run of each, the two dtypes take turns for `rounds`
    rounds and each keeps its best time, so that a burst of load from elsewhere on the machine
    slows both rather than every run of one (two back-to-back runs of each once let such bursts
    make bf16 look as slow as f32 in 2 of 4 loads on a shared AMD Zen 4, which then cached f32:
    0.9 GB more and 1.8x slower vision). When bf16's warm-up alone is over 3x f32's, bf16 is
    clearly slower (emulated) and is not run again."""
    warm = {name: run(name) for name in ("f32", "bf16")}
    if warm["bf16"] > 3 * warm["f32"]:
        return warm["f32"], warm["bf16"]
    best = {name: float("inf") for name in warm}
    for _ in range(rounds):
        for name in best:
            best[name] = min(best[name], run(name))
    return best["f32"], best["bf16"]


# --------------------------------------------------------------------------- the choice


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or corrupt: measured again
        return {}
    return data if isinstance(data, dict) else {}


def _cached_entry(data: dict, key: str) -> tuple[float, float] | None:
    """The entry's timings, or None when it is missing, of another probe version or malformed."""
    e = data.get(key)
    if not isinstance(e, dict) or e.get("probe") != PROBE_VERSION:
        return None
    f32_ms, bf16_ms = e.get("f32_ms"), e.get("bf16_ms")
    if not all(isinstance(v, (int, float)) and v > 0 for v in (f32_ms, bf16_ms)):
        return None
    return float(f32_ms), float(bf16_ms)


def _write_cache(path: Path, data: dict) -> None:
    """Atomic write; a cache that cannot be written only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vision-dtype.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return  # read-only or full home: the next load measures again


def choose_vision_dtype(
    requested: str = "auto",
    threads: int | None = None,
    *,
    cache: Path | None = None,
    measure_fn: Callable[[int], tuple[float, float]] = measure,
) -> DtypeChoice:
    """`requested` = "auto" (measured once per machine, then cached), "bf16" or "f32" (forced)."""
    req = {"bfloat16": "bf16", "float32": "f32"}.get(requested, requested)
    if req in DTYPES:
        return DtypeChoice(req, "forced")
    if req != "auto":
        raise ValueError(f"vision dtype: {requested!r} is not one of auto, bf16, f32")
    threads = threads or default_threads()
    path = (cache or user_cache_dir()) / CACHE_FILE
    key = cache_key(threads)
    data = _read_cache(path)
    hit = _cached_entry(data, key)
    if hit is not None:
        return DtypeChoice(decide(*hit), "cached", *hit)
    f32_ms, bf16_ms = measure_fn(threads)
    data[key] = {
        "probe": PROBE_VERSION,
        "f32_ms": round(f32_ms, 2),
        "bf16_ms": round(bf16_ms, 2),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_cache(path, data)
    return DtypeChoice(decide(f32_ms, bf16_ms), "measured", f32_ms, bf16_ms)
