"""§3 Language model (Q4_K_M): prefill and decode tokens/s, `MiniCPMV.chat` vs a bare llama_decode loop."""

from __future__ import annotations

import time

import numpy as np

from .. import ours
from ..common import median
from ..measure import Runs, chatml, gen_count, prompt_count
from ..report import fmt_list, row
from ..session import Session


def run(bench: Session) -> dict:
    s = bench.scale
    budget = bench.runs_budget("llm")
    args = {
        "lm": str(bench.lm),
        "mmproj": str(bench.mmproj),
        "threads": bench.threads,
        "runs": bench.runs,
        "n_prompt": s.n_prompt,
        "n_gen": s.n_gen,
        "n_ctx": s.n_prompt + s.n_gen + 64,
        "budget_s": budget / 2 if budget is not None else None,
    }
    # each side in a fresh process of its own: two mappings of the same file in one process (llama.cpp's
    # default and ours, whose dropped pages and madvise act on the shared inode) slowed the one measured
    # second by ~13% on an Intel Xeon with AMX, where either alone decodes at the same speed
    bare = bench.worker("llm", {**args, "side": "bare"}).result
    m = bench.worker("llm", {**args, "side": "ours", "texts": bare["texts"]})
    r = {**bare, **m.result}
    r["n_prompt"] = [[b, o] for b, o in zip(bare["n_prompt"], m.result["n_prompt"])]
    rows = []
    for what, target in (("prefill", None), ("decode", 0.97)):
        o, b = r[f"ours_{what}_tps"], r[f"bare_{what}_tps"]
        ratio = median([x / y for x, y in zip(o, b)])
        rows.append(
            row(
                f"{what} tokens/s",
                median(o),
                median(b),
                unit="tok/s",
                ratio=ratio,
                better="higher",
                target=f">= {target}x" if target else "",
                met=(ratio >= target) if target else None,
            )
        )
    notes = [
        f"same Q4_K_M GGUF, {bench.threads} threads; llama.cpp = a bare `llama_decode` loop (one 512-token "
        "batch, then greedy one-token decodes); ours = `MiniCPMV.chat` on a text-only message of the same "
        "length (stream=True, default sampling: penalty, top-k, temperature, top-p), prefill = prompt "
        "tokens / time to first token (ours: the runtime's own ttft counter, which includes building and tokenizing "
        "the prompt), decode = one-token `llama_decode` calls after the first token / (total - time to first "
        "token) (ours decodes every sampled token, the bare loop all but the last). Each side runs in a fresh "
        "worker process of its own, the bare loop first.",
        f"{len(r['bare_decode_tps'])} runs after a warm-up; prompt tokens (bare, ours) {r['n_prompt']}; generated "
        f"(asked, ours) {r.get('n_gen')}.",
        f"per-run decode tok/s: bare {fmt_list(r['bare_decode_tps'])}, ours {fmt_list(r['ours_decode_tps'])}.",
    ]
    return {"rows": rows, "notes": notes, "raw": r}


# --------------------------------------------------------------------------- measured (bench.worker)


def _words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = (
        "the model reads a long document about rivers mountains cities weather music history "
        "science gardens machines languages numbers colours animals stories markets travel"
    ).split()
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def _prompt_text(lm, n_prompt: int, run: int) -> tuple[str, list[int]]:
    """A user text whose chat prompt is n_prompt tokens (or a token or two less: BPE merges make
    some lengths unreachable). It starts with the run number so that no two runs share a KV-cache
    prefix beyond the first few tokens."""

    def make(k: int) -> tuple[str, list[int]]:
        text = f"Run {run}: " + _words(k, run)
        return text, lm.tokenize(chatml(text))

    lo, hi = 1, n_prompt  # largest word count whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(make(mid)[1]) <= n_prompt:
            lo = mid
        else:
            hi = mid - 1
    text, toks = make(lo)
    while len(toks) < n_prompt:  # pad one short token at a time
        t2 = lm.tokenize(chatml(text + " a"))
        if len(t2) > n_prompt:
            break
        text, toks = text + " a", t2
    return text, toks


def measure(a: dict) -> dict:
    """One side ("bare" or "ours") of the comparison; the bare side picks the prompt texts, which the ours
    side gets in a["texts"]."""
    T, runs, n_prompt, n_gen = a["threads"], a["runs"], a["n_prompt"], a["n_gen"]
    n_ctx = a.get("n_ctx", 2048)
    res: dict = {"n_prompt": []}
    if a["side"] == "bare":
        from ..llamacpp import BareLM

        bare = BareLM(a["lm"], n_ctx=n_ctx, n_threads=T)

        def bare_once(toks: list[int], n: int) -> tuple[float, float, int]:
            bare.clear()
            t0 = time.perf_counter()
            pos = bare.prefill(toks)
            t_pre = time.perf_counter()
            out, t_first = bare.generate(pos, n)
            t_end = time.perf_counter()
            ttft = (t_pre - t0) + t_first
            return ttft, t_end - t0, len(out)

        bare_once(_prompt_text(bare, 64, 999)[1], 4)  # warm-up: page the weights in, spin up the thread pool
        res.update(bare_prefill_tps=[], bare_decode_tps=[], texts=[])
        for r in Runs(runs, a.get("budget_s")):
            text, toks = _prompt_text(bare, n_prompt, r)
            ttft, total, n_out = bare_once(toks, n_gen)
            res["bare_prefill_tps"].append(len(toks) / ttft)
            res["bare_decode_tps"].append((n_out - 1) / (total - ttft))
            res["texts"].append(text)
            res["n_prompt"].append(len(toks))
        bare.close()
        return res

    MiniCPMV = ours.need("runtime", "MiniCPMV")
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=n_ctx, n_threads=T)

    def ours_once(text: str, n: int) -> tuple[float, float, int, dict]:
        ours.reset(model)
        r = ours.timed_chat(model, [{"role": "user", "content": [text]}], max_new_tokens=n)
        n_out = gen_count(r.counters, r.n_pieces)
        return r.ttft_s, r.total_s, n_out, r.counters

    ours_once(_words(40, 999), 4)  # warm-up
    res.update(ours_prefill_tps=[], ours_decode_tps=[], ours_counters=[], n_gen=[])
    for text in a["texts"]:
        ttft, total, n_out, counters = ours_once(text, n_gen)
        res["ours_prefill_tps"].append((prompt_count(counters) or 0) / ttft)
        # ours decodes every sampled token (the last one too, so the KV cache holds the whole turn
        # for the next one): n_out decode calls after the first token; the bare loop makes n - 1
        res["ours_decode_tps"].append(n_out / (total - ttft) if n_out > 0 else 0.0)
        res["ours_counters"].append(counters)
        res["n_prompt"].append(prompt_count(counters))
        res["n_gen"].append([n_gen, n_out])
    return res
