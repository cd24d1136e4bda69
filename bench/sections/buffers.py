"""§3b Where llama.cpp keeps the weights (runtime/buffers.py): prefill and decode tokens/s of the bare
llama.cpp loop for each placement, on this machine's CPU.

"llama" = llama.cpp's own choice (`use_extra_bufts`: AMX first where the library has it, then
CPU_REPACK); "repack" = what the runtime ships where the library has AMX (CPU_REPACK by tensor name,
never AMX); "none" = `use_extra_bufts = false` (plain memory). On a CPU with AMX the "llama" row is
not measured: that placement crashes (llama.cpp PR #26954).
"""

from __future__ import annotations

import time

from ..common import median
from ..report import fmt_list, row
from ..session import Session

MODES = ("llama", "repack", "none")


def run(bench: Session) -> dict:
    s = bench.scale
    m = bench.worker(
        "buffers", {"lm": str(bench.lm), "threads": bench.threads, "n_prompt": s.n_prompt, "n_gen": 64, "runs": 2}
    )
    r = m.result
    rows = []
    ref = r["modes"].get("llama") or r["modes"].get("repack")
    for mode, v in r["modes"].items():
        for what in ("prefill", "decode"):
            tps = median(v[f"{what}_tps"])
            base = median(ref[f"{what}_tps"])
            rows.append(
                row(
                    f"{what} tokens/s, weights: {mode}",
                    tps,
                    None,
                    unit="tok/s",
                    better="higher",
                    note=f"{tps / base:.3f}x llama.cpp's own placement" if mode != "llama" and ref else "",
                )
            )
    notes = [
        f"bare llama.cpp loop on the Q4_K_M GGUF, {bench.threads} threads, {s.n_prompt}-token prefill then 64 "
        f"greedy decodes, {len(ref['decode_tps'])} runs per placement after a warm-up; this run's shipped "
        f"placement: {r['shipped']}.",
        "per-run decode tok/s: " + "; ".join(f"{k} {fmt_list(v['decode_tps'])}" for k, v in r["modes"].items()),
        f'"repack" names {r["modes"].get("repack", {}).get("n_repacked", "?")} tensors for CPU_REPACK.',
    ]
    if r.get("skipped"):
        notes.append(f"not measured: {r['skipped']}")
    return {"rows": rows, "notes": notes, "raw": r}


# --------------------------------------------------------------------------- measured (bench.worker)


def measure(a: dict) -> dict:
    from minicpmv.runtime.weight_buffers import BufferPlan, plan_for_this_machine, system_features

    from ..llamacpp import BareLM
    from .llm import _prompt_text

    res: dict = {"modes": {}, "shipped": plan_for_this_machine().mode}
    amx = system_features().get("AMX_INT8") == "1"
    for mode in MODES:
        if mode == "llama" and amx:
            res["skipped"] = "llama.cpp's own placement (AMX) crashes on this library"
            continue
        lm = BareLM(
            a["lm"], n_ctx=a["n_prompt"] + a["n_gen"] + 64, n_threads=a["threads"], buffers=BufferPlan(mode, "bench")
        )
        v = {"prefill_tps": [], "decode_tps": [], "n_repacked": len(lm.lm.buffers.repacked)}
        for run in range(a["runs"] + 1):
            _, toks = _prompt_text(lm.lm, a["n_prompt"], run)
            lm.clear()
            t0 = time.perf_counter()
            pos = lm.prefill(toks)
            t1 = time.perf_counter()
            out, _ = lm.generate(pos, a["n_gen"])
            t2 = time.perf_counter()
            if run:  # the first is a warm-up
                v["prefill_tps"].append(len(toks) / (t1 - t0))
                v["decode_tps"].append((len(out) - 1) / (t2 - t1))
        lm.close()
        res["modes"][mode] = v
    return res
