"""§4a End to end: a 1344x1344 image question, `MiniCPMV.chat` vs mtmd's pipeline (time to first token, total)."""

from __future__ import annotations

import time

import numpy as np

from .. import ours
from ..common import median
from ..measure import QUESTION, Runs, chatml, gen_count
from ..report import fmt_list, row
from ..session import Session


def run(bench: Session) -> dict:
    s = bench.scale
    m = bench.worker(
        "e2e",
        {
            "lm": str(bench.lm),
            "mmproj": str(bench.mmproj),
            "image": str(bench.image()),
            "threads": bench.threads,
            "runs": bench.e2e_runs,
            "n_gen": s.e2e_gen,
            "n_ctx": 4096,
            "warmup": 1,
            "budget_s": bench.runs_budget("e2e"),
        },
    )
    r = m.result
    rows = []
    for what, target in (("ttft", 0.6), ("total", None)):
        o, b = r[f"ours_{what}_s"], r[f"mtmd_{what}_s"]
        ratio = median([x / y for x, y in zip(o, b)])
        label = "time to first token" if what == "ttft" else f"total time ({median(r['n_gen']):.0f} tokens generated)"
        rows.append(
            row(
                label,
                median(o),
                median(b),
                unit="s",
                ratio=ratio,
                target=f"<= {target}x" if target else "",
                met=(ratio <= target) if target else None,
            )
        )
    c0 = r["ours_counters"][0] if r["ours_counters"] else {}
    notes = [
        f"1344x1344 picture, ctx 4096, {bench.threads} threads, same Q4_K_M + f16 mmproj. llama.cpp = "
        "`mtmd_tokenize` + `mtmd_helper_eval_chunks` (its clip encodes every chunk, then decodes), then a "
        "greedy decode loop making as many one-token decodes as ours asks for; ours = `MiniCPMV.chat` "
        "(stream=True, vision dtype auto), one pixel changed per run so no encoding is reused; preprocessing "
        "included on both sides; the side that goes first alternates from run to run.",
        f"{len(r['ours_ttft_s'])} runs after a warm-up with a 448x448 picture; mtmd prompt tokens "
        f"{r['mtmd_n_tokens'][:1]}, ours {c0.get('prompt_tokens')} (ours adds `<image_id>0</image_id>` as the "
        "reference does).",
        f"per-run TTFT: ours {fmt_list(r['ours_ttft_s'])} s, mtmd {fmt_list(r['mtmd_ttft_s'])} s.",
    ]
    if c0.get("vision_slots"):
        notes.append(
            f"ours, first run: vision {c0['vision_ms_total'] / 1e3:.1f} s for {c0['vision_slots']} slices "
            f"({c0['vision_ms_total'] / 1e3 / c0['vision_slots']:.2f} s each), LM prefill "
            f"{c0.get('prefill_ms', 0) / 1e3:.1f} s for {c0.get('tokens_prefilled')} positions."
        )
    return {"rows": rows, "notes": notes, "raw": r}


# --------------------------------------------------------------------------- measured (bench.worker)


def measure(a: dict) -> dict:
    from PIL import Image

    from tests.mtmd import Mtmd, marker

    from ..llamacpp import BareLM
    from ..media import picture, variant

    T, runs, n_gen, n_ctx = a["threads"], a["runs"], a["n_gen"], a.get("n_ctx", 4096)
    sides = a.get("sides", ["ours", "mtmd"])
    img = Image.open(a["image"]).convert("RGB")
    small = picture(448, 448, seed=2)
    res: dict = {}
    model = bare = mt = None
    if "ours" in sides:
        MiniCPMV = ours.need("runtime", "MiniCPMV")
        t0 = time.perf_counter()
        model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=n_ctx, n_threads=T)
        res["ours_load_s"] = time.perf_counter() - t0
    if "mtmd" in sides:
        t0 = time.perf_counter()
        bare = BareLM(a["lm"], n_ctx=n_ctx, n_threads=T)
        mt = Mtmd(a["mmproj"], bare.lm, n_threads=T, warmup=True)
        res["mtmd_load_s"] = time.perf_counter() - t0
    prompt = chatml(f"{marker()}\n{QUESTION}")

    def ours_once(im, n: int):
        ours.reset(model)
        r = ours.timed_chat(model, [{"role": "user", "content": [im, QUESTION]}], max_new_tokens=n)
        return r.ttft_s, r.total_s, gen_count(r.counters, r.n_pieces), r.counters

    def mtmd_once(im, n: int):
        bare.clear()
        t0 = time.perf_counter()
        with mt.tokenize([np.asarray(im)], prompt) as chunks:
            n_tok = chunks.n_tokens
            n_past = chunks.eval(bare.ctx)
            t_eval = time.perf_counter()
            out, t_first = bare.generate(n_past, n)
            t_end = time.perf_counter()
        return (t_eval - t0) + t_first, t_end - t0, len(out), n_tok

    if a.get("warmup", 1):
        if model is not None:
            ours_once(small, 2)
        if mt is not None:
            mtmd_once(small, 2)
    for k in ("ours_ttft_s", "ours_total_s", "mtmd_ttft_s", "mtmd_total_s", "ours_counters", "n_gen", "mtmd_n_tokens"):
        res[k] = []
    for r in Runs(runs, a.get("budget_s")):
        im = variant(img, r + 1)

        def run_ours(im=im):
            ttft, total, n_out, counters = ours_once(im, n_gen)
            res["ours_ttft_s"].append(ttft)
            res["ours_total_s"].append(total)
            res["ours_counters"].append(counters)
            res["n_gen"].append(n_out)

        def run_mtmd(im=im):
            # n_gen + 1 samples = n_gen one-token decodes, as ours makes for n_gen tokens
            ttft, total, n_m, n_tok = mtmd_once(im, n_gen + 1)
            res["mtmd_ttft_s"].append(ttft)
            res["mtmd_total_s"].append(total)
            res["mtmd_n_tokens"].append(n_tok)

        # alternate which side goes first, so neither always pays (or always skips) a first-run cost
        order = [run_ours, run_mtmd] if r % 2 == 0 else [run_mtmd, run_ours]
        for f in order:
            if (f is run_ours and model is not None) or (f is run_mtmd and mt is not None):
                f()
        if model is None:
            res["n_gen"].append(n_gen)
    if mt is not None:
        mt.close()
        bare.close()
    return res
