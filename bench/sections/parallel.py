"""§4d Several conversations at once (issue 30): runtime/batch.py's `BatchChat` vs llama-server's slots.

- Aggregate decode tokens/s with 1, 2 and 4 concurrent text requests (128 new tokens each), ours with k
  slots vs `llama-server -np k` (built once from the pinned sources, bench/llama_server.py) on the same
  prompt tokens and sampling settings.
- Time to first token of a short text request that arrives while the e2e section's 1344x1344 image
  question is being prefilled (once while the image is encoded, once during its language-model
  prefill), with the one-at-a-time counterfactual: the image's remaining time to first token then.
- Peak RSS of a process with 4 slots of cli/serve.py's SLOT_CTX positions running those requests.
- The measurements behind two parameters: the prefill chunk (runtime/batch.py CHUNK) swept with 3
  generating streams beside one long prompt, and what the vision thread costs the generating streams.

Ours is `BatchChat` driven step by step in the worker, each `step()` timed from outside and the slots'
states read before and after it (nothing in the runtime is changed for the benchmark).
"""

from __future__ import annotations

import threading
import time

from .. import llama_server, ours
from ..common import BenchError, Skip, median
from ..measure import QUESTION
from ..report import fmt_list, row
from ..session import Session

KS = (1, 2, 4)
CHUNKS = (16, 32, 64, 128)
N_PROMPT = 128  # positions of each decode request's prompt (similar lengths, distinct from the first words on)
N_STREAM_PROMPT = 64  # the sweep's 3 generating streams
N_LONG = 512  # the prompt prefilled beside them
N_TTFT_PROMPT = 32  # the text that arrives during the image prefill: a short question, one chunk
SPEEDUP_TARGET, TTFT_TARGET = 3.0, 5.0
# the reference's sampling (schema.REFERENCE_SAMPLING), given to llama-server as its own parameters
SAMPLING = {"temperature": 0.7, "top_k": 100, "top_p": 0.8, "min_p": 0.0, "repeat_penalty": 1.03}


def run(bench: Session) -> dict:
    from minicpmv.cli.serve import SLOT_CTX
    from minicpmv.runtime.batch import CHUNK

    s = bench.scale
    notes: list[str] = []
    binary = server_why = None
    build_info: dict = {}
    try:
        binary, build_info = bench.llama_server()
    except Skip as e:
        server_why = str(e)
    common = {"lm": str(bench.lm), "threads": bench.threads, "slot_ctx": SLOT_CTX}
    m = bench.worker(
        "parallel",
        common
        | {
            "mmproj": str(bench.mmproj),
            "image": str(bench.image()),
            "ks": list(KS),
            "n_prompt": N_PROMPT,
            "n_gen": s.n_gen,
            "chunks": list(CHUNKS),
            "n_long": N_LONG,
            "n_stream_prompt": N_STREAM_PROMPT,
        },
    )
    r = m.result
    lc: dict | None = None
    if binary is not None:
        try:
            lc = bench.worker(
                "parallel_llama",
                common | {"binary": str(binary), "log": str(bench.log), "prompts": r["prompts"], "n_gen": s.n_gen},
            ).result
        except (BenchError, Skip) as e:
            server_why = f"llama-server did not run: {str(e).splitlines()[0]}"
    im = bench.worker(
        "parallel_image", common | {"mmproj": str(bench.mmproj), "image": str(bench.image()), "n_text": N_TTFT_PROMPT}
    )
    ri = im.result

    rows = []
    agg = {k: r["decode"][str(k)]["agg_tps"] for k in KS}
    lagg = {k: lc["decode"][str(k)]["agg_tps"] for k in KS} if lc else {}
    for k in KS:
        lv = lagg.get(k)
        rows.append(
            row(
                f"aggregate decode tokens/s, {k} concurrent text request{'s' if k > 1 else ''} "
                f"(llama.cpp: llama-server -np {k})",
                agg[k],
                lv,
                unit="tok/s",
                better="higher",
                target=">= 1x" if k == 4 and lv else "",
                met=(agg[k] >= lv) if k == 4 and lv else None,
            )
        )
    speed = agg[4] / agg[1] if agg[1] else None
    lspeed = lagg[4] / lagg[1] if lagg.get(1) else None
    rows.append(
        row(
            "aggregate decode at 4 streams / at 1 stream, ours",
            speed,
            None,
            unit="x",
            target=f">= {SPEEDUP_TARGET:g}x",
            met=None if speed is None else speed >= SPEEDUP_TARGET,
            note=f"llama-server: {lspeed:.2f}x" if lspeed else "",
        )
    )
    for case, label in (("vision", "while the image is encoded"), ("prefill", "during the image's LM prefill")):
        c = ri["cases"][case]
        rows.append(
            row(
                f"time to first token of a {c['text_prompt_tokens']}-token text request arriving {label}",
                c["text_ttft_s"],
                None,
                unit="s",
                target=f"<= {TTFT_TARGET:g} s",
                met=c["text_ttft_s"] <= TTFT_TARGET,
                note=f"one at a time it would first wait {c['image_remaining_s']:.1f} s for the image's first token",
            )
        )
    rows.append(
        row(
            f"peak RSS, 4 slots x {SLOT_CTX} positions (image question + text requests)",
            im.peak_rss_gb,
            lc.get("rss_np4_gb") if lc else None,
            unit="GB",
            note="llama.cpp: llama-server -np 4, text only" if lc and lc.get("rss_np4_gb") else "",
        )
    )

    # ---------------------------------------------------------------- notes
    d4 = r["decode"]["4"]
    notes.append(
        f"Same Q4_K_M GGUF, {bench.threads} threads. Aggregate decode tokens/s = tokens generated by all k requests "
        "in the phase in which all k are generating / that phase's wall time: from the moment the last of the k "
        "streams has its first token to the moment the first one has its last, so prefill and vision are "
        "excluded; the same definition for both sides (ours: the time after each `BatchChat.step()` and each "
        "slot's token count; llama-server: the arrival of each streamed `/completion` chunk and its "
        "`tokens_predicted`)."
    )
    notes.append(
        f"Requests: k text prompts of {N_PROMPT} positions (the same token ids for both sides, each starting "
        f"with its own run number), {s.n_gen} new tokens, the reference's sampling (temperature 0.7, top-k 100, "
        "top-p 0.8, repetition penalty 1.03; llama-server: the same values, min-p 0, its own sampler chain), "
        "a fixed seed per request; ours k slots of "
        f"{SLOT_CTX} positions (`BatchChat(model, k, {SLOT_CTX})`, prefill chunk {CHUNK}), llama-server "
        f"`-np k -c k*{SLOT_CTX} --no-kv-unified`. One run per k after a warm-up (the issue's protocol)."
    )
    gen_counts = {k: r["decode"][str(k)]["n_gen"] for k in KS}
    lgen = {k: lc["decode"][str(k)]["n_gen"] for k in KS} if lc else {}
    notes.append(
        f"Tokens generated per request: ours {gen_counts}"
        + (f", llama-server {lgen}" if lc else "")
        + "; phase lengths (s): ours "
        + ", ".join(f"{k}: {r['decode'][str(k)]['window_s']:.1f}" for k in KS)
        + (", llama-server " + ", ".join(f"{k}: {lc['decode'][str(k)]['window_s']:.1f}" for k in KS) if lc else "")
        + f". Ours at 4 streams: {d4['window_tokens']} tokens in the phase, median step "
        f"{d4['step_s_median'] * 1e3:.0f} ms."
    )
    if lc:
        notes.append(
            "llama-server's own `timings.predicted_per_second`, summed over the k requests: "
            + ", ".join(f"{k}: {lc['decode'][str(k)]['server_tps_sum']:.2f}" for k in KS)
            + f" tok/s; load {fmt_list([lc['decode'][str(k)]['load_s'] for k in KS])} s."
        )
    if build_info:
        how = "cached from an earlier run" if build_info.get("cached") else "built in this run"
        secs = build_info.get("seconds")
        notes.append(
            f"llama-server: {how} ({build_info.get('path')}"
            + (f"; the build took {secs / 60:.1f} min with {build_info.get('jobs')} jobs" if secs else "")
            + f") from the llama-cpp-python {llama_server.version()} sdist's vendor/llama.cpp, target llama-server "
            "only, options: "
            + (" ".join(o.removeprefix("-D") for o in build_info.get("options", [])) or "unknown")
            + ". Without AMX compiled in, its weights go to CPU_REPACK, as ours."
        )
    if server_why:
        notes.append(f"llama-server figures missing: {server_why}; ours is compared with its own 1-stream figure only.")
    for case in ("vision", "prefill"):
        c = ri["cases"][case]
        notes.append(
            f"TTFT, text arriving {'while the image is encoded' if case == 'vision' else 'during the LM prefill'}: "
            f"arrived {c['arrival_s']:.1f} s after the image request (image slot {c['arrival_state']}), first token "
            f"after {c['text_ttft_s']:.2f} s ({c['text_steps']} steps after the one in flight, "
            f"{c['image_chunks_meanwhile']} of them image chunks; slots image/text {c['slots']}); the image's first "
            f"token came {c['image_ttft_s']:.1f} s after its "
            f"request ({c['image_remaining_s']:.1f} s after the text arrived: the one-at-a-time wait, measured while "
            f"sharing, so slightly longer than alone); image vision {c['image_vision_s']:.1f} s for "
            f"{c['image_slices']} slices, LM prefill {c['image_prefill_s']:.1f} s for {c['image_positions']} positions."
        )
    n_text = ri["cases"]["prefill"]["text_prompt_tokens"]
    notes.append(
        f"TTFT: the {n_text}-position text prompt is {-(-n_text // CHUNK)} chunk(s) of {CHUNK}. During the LM "
        "prefill it arrives a quarter into the image's prefill time (from another thread, as a request reaches the "
        "server: at any moment of a step), so it waits for the rest of the step in flight, then for its own chunks "
        "and whatever image chunks the runtime puts before them; while the image is encoded the decode loop is "
        "idle and the text starts at once."
    )
    notes.append(
        f"Peak RSS: the worker that ran the two image questions above (4 slots x {SLOT_CTX} positions, f16 KV "
        "cache allocated for all of them, the vision encoder's activations for 10 slices)."
    )
    sw = r["sweep"]
    notes.append(
        f"Chunk sweep (3 generating streams, a {N_LONG}-position prompt prefilled beside them): "
        + "; ".join(
            f"chunk {c}: step {sw[str(c)]['step_s_median'] * 1e3:.0f} ms (max {sw[str(c)]['step_s_max'] * 1e3:.0f}), "
            f"prompt {sw[str(c)]['pos_per_s']:.1f} positions/s, streams {sw[str(c)]['stream_tps']:.2f} tok/s"
            for c in CHUNKS
        )
        + f"; the 3 streams alone: step {r['sweep_alone_step_s'] * 1e3:.0f} ms "
        f"({3 / r['sweep_alone_step_s']:.2f} tok/s). {r.get('chunk_note', '')}".rstrip()
        + " "
        + chunk_advice(r, CHUNK)
    )
    steps = {
        1: r["decode"]["1"]["step_s_median"],
        2: r["decode"]["2"]["step_s_median"],
        3: r["sweep_alone_step_s"],
        4: d4["step_s_median"],
    }
    notes.append(
        "One decode step (sampling included) with 1, 2, 3, 4 generating streams: "
        + ", ".join(f"{steps[n] * 1e3:.0f} ms" for n in steps)
        + f" ({', '.join(f'{n / steps[n]:.2f}' for n in steps)} tok/s). "
        + step_reading(steps)
    )
    v = r["vision"]
    notes.append(
        f"Vision sharing: 3 generating streams' decode step {v['alone_step_s'] * 1e3:.0f} ms alone, "
        f"{v['shared_step_s'] * 1e3:.0f} ms median (max {v['shared_step_max_s'] * 1e3:.0f} ms, {v['shared_steps']} "
        f"steps) while the vision thread encoded the 1344x1344 image ({v['shared_step_s'] / v['alone_step_s']:.2f}x); "
        f"vision {v['shared_per_slice_s']:.2f} s per slice while sharing the cores ({v['shared_slices']} slices, "
        f"{v['shared_vision_s']:.1f} s) vs {v['alone_per_slice_s']:.2f} s alone (a 448x448 picture). "
        + vision_advice(v)
    )
    raw = {"ours": r, "llama_server": lc, "image": ri, "build": build_info, "server_why": server_why}
    return {"rows": rows, "notes": notes, "raw": raw}


def ttft_estimate(sw: dict, c: int, n: int) -> float:
    """Seconds to the first token of an n-position prompt arriving during another prompt's prefill with chunk c
    and 3 streams generating, from the sweep's step times: the step in flight, then ceil(n / c) steps of its
    own (each min(c, n) positions) if they go first."""
    own = sw[str(min(c, n))]["step_s_median"] if str(min(c, n)) in sw else sw[str(c)]["step_s_median"]
    return sw[str(c)]["step_s_median"] + -(-n // c) * own


def chunk_advice(r: dict, current: int) -> str:
    """What the sweep implies for CHUNK. Each step costs what the generating streams' tokens cost plus ~1/20 s
    per prompt position on this CPU (compute-bound), so a larger chunk raises the prompt's rate only a little
    while every generating stream waits a whole step per token; and a newcomer's first token waits for the
    step in flight plus its own chunks. The pick: the chunk with the lowest mean estimated time to first token
    of a short (32) and a longer (128-position) question."""
    sw = r["sweep"]
    sizes = [c for c in CHUNKS if str(c) in sw]
    est = {c: (ttft_estimate(sw, c, 32), ttft_estimate(sw, c, 128)) for c in sizes}
    best = min(sizes, key=lambda c: sum(est[c]))
    b = sw[str(best)]
    text = (
        "Estimated time to first token of a 32 / 128-position question arriving meanwhile (the step in flight, "
        "then its own chunks): "
        + ", ".join(f"chunk {c}: {est[c][0]:.1f} / {est[c][1]:.1f} s" for c in sizes)
        + f". Implication for CHUNK ({current} now): {best} gives the lowest of these, with the generating streams "
        f"waiting {b['step_s_median']:.1f} s per token and the prompt at {b['pos_per_s']:.1f} positions/s"
    )
    big = max(sizes)
    if big != best:
        gain = sw[str(big)]["pos_per_s"] / b["pos_per_s"] - 1
        text += (
            f"; {big} would prefill {gain:.0%} faster but stall the streams {sw[str(big)]['step_s_median']:.1f} s "
            "per token"
        )
    return text + "."


def vision_advice(v: dict) -> str:
    slow = v["shared_step_s"] / v["alone_step_s"] if v["alone_step_s"] else 0.0
    vis = v["shared_per_slice_s"] / v["alone_per_slice_s"] if v["alone_per_slice_s"] else 0.0
    return (
        f"Sharing the cores costs the generating streams {slow:.2f}x their step time and the encoder {vis:.2f}x its "
        f"time per slice; encoding between steps instead would stop the streams for the whole "
        f"{v['shared_vision_s']:.1f} s (or, a slice at a time, {v['alone_per_slice_s']:.2f} s per slice)."
    )


# --------------------------------------------------------------------------- measured (bench.worker)


class _Driver:
    """Steps a BatchChat and records, for each tracked request, (seconds, tokens generated) after every
    step that changed it, and each step's duration with the tracked requests' states before it."""

    def __init__(self, bc):
        self.bc = bc
        self.t0 = time.perf_counter()
        self.reqs: list = []
        self.series: dict[int, list[tuple[float, int]]] = {}
        self.steps: list[dict] = []

    def track(self, req):
        return self.adopt(self.bc.submit(req))

    def adopt(self, req):
        """Follow a request submitted elsewhere (another thread)."""
        self.series[id(req)] = []
        self.reqs.append(req)
        return req

    def slot(self, req):
        return next((s for s in self.bc.slots if s.req is req), None)

    def state(self, req) -> str:
        s = self.slot(req)
        if s is not None:
            return s.state
        return "done" if req.finished.is_set() else "waiting"

    def count(self, req) -> int:
        s = self.slot(req)
        if s is not None and s.gen is not None:
            return len(s.gen.tokens)
        return len(req.answer.tokens) if req.answer is not None else 0

    def step(self) -> dict | None:
        """One `step()`; None when it decoded nothing (only the vision thread was working)."""
        before = {id(r): self.state(r) for r in self.reqs}
        left = {id(r): len(self.slot(r).parts) for r in self.reqs if self.slot(r) is not None}
        n0 = self.bc.steps
        t = time.perf_counter()
        self.bc.step()
        t1 = time.perf_counter()
        if self.bc.steps == n0:
            time.sleep(0.005)
            return None
        for r in self.reqs:
            n, ser = self.count(r), self.series[id(r)]
            if n and (not ser or ser[-1][1] != n):
                ser.append((t1 - self.t0, n))
        # whose prompt chunk this step decoded (of the requests that were in a slot before it)
        chunk = [id(r) for r in self.reqs if id(r) in left and self._left(r) < left[id(r)]]
        rec = {"t": t1 - self.t0, "dt": t1 - t, "before": before, "chunk_of": chunk}
        self.steps.append(rec)
        return rec

    def _left(self, req) -> int:
        s = self.slot(req)
        return len(s.parts) if s is not None else 0

    def idle(self) -> bool:
        return not self.bc.busy

    def until(self, cond) -> None:
        while not cond():
            self.step()


def aggregate(series: list[list[tuple[float, int]]]) -> dict:
    """Tokens/s of the phase in which every stream generates: from the time the last stream had its first
    token to the time the first one had its last; tokens = what each stream generated in between."""
    if not series or any(not s for s in series):
        return {"agg_tps": 0.0, "window_s": 0.0, "window_tokens": 0}
    t_a = max(s[0][0] for s in series)
    t_b = min(next(t for t, n in s if n == s[-1][1]) for s in series)

    def at(s, t):
        return max((n for tt, n in s if tt <= t), default=0)

    if t_b <= t_a:
        return {"agg_tps": 0.0, "window_s": 0.0, "window_tokens": 0}
    tokens = sum(at(s, t_b) - at(s, t_a) for s in series)
    return {"agg_tps": tokens / (t_b - t_a), "window_s": t_b - t_a, "window_tokens": tokens}


def _text(model, n: int, run: int) -> tuple[list[dict], list[int]]:
    from ..measure import chatml
    from .llm import _prompt_text

    text, toks = _prompt_text(model.lm, n, run)
    assert model.lm.tokenize(chatml(text)) == toks
    return [{"role": "user", "content": [text]}], toks


def measure(a: dict) -> dict:
    """Ours: decode with k = 1, 2, 4 slots, the chunk sweep and the vision sharing cost."""
    from PIL import Image

    from ..media import picture, variant

    MiniCPMV = ours.need("runtime", "MiniCPMV")
    BatchChat = ours.need("runtime.batch", "BatchChat")
    BatchRequest = ours.need("runtime.batch", "BatchRequest")
    T, slot_ctx, n_gen = a["threads"], a["slot_ctx"], a["n_gen"]
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_threads=T)
    res: dict = {"decode": {}, "prompts": {}, "sweep": {}}

    # warm-up (weights paged in, torch's first call), then the vision encoder alone on one slice
    bc = BatchChat(model, 1, slot_ctx)
    dr = _Driver(bc)
    small = picture(448, 448, seed=2)
    for i in range(2):
        req = dr.track(
            BatchRequest([{"role": "user", "content": [variant(small, 100 + i), QUESTION]}], {"max_new_tokens": 2})
        )
        dr.until(lambda req=req: req.finished.is_set())
    alone_ms = req.stats.vision_ms
    bc.close()

    for k in a["ks"]:
        bc = BatchChat(model, k, slot_ctx)
        dr = _Driver(bc)
        reqs, prompts = [], []
        for i in range(k):
            msgs, toks = _text(model, a["n_prompt"], 100 * k + i)
            prompts.append(toks)
            reqs.append(dr.track(BatchRequest(msgs, {"max_new_tokens": n_gen, "seed": 1000 + i})))
        t0 = time.perf_counter()
        dr.until(dr.idle)
        wall = time.perf_counter() - t0
        bc.close()
        for q in reqs:
            if q.error is not None:
                raise q.error
        agg = aggregate([dr.series[id(q)] for q in reqs])
        all_gen = [st["dt"] for st in dr.steps if all(v == "generating" for v in st["before"].values())]
        res["decode"][str(k)] = agg | {
            "n_gen": [len(q.answer.tokens) for q in reqs],
            "finish": [q.stats.finish_reason for q in reqs],
            "prompt_tokens": [q.stats.prompt_tokens for q in reqs],
            "wall_s": wall,
            "steps": len(dr.steps),
            "step_s_median": median(all_gen) if all_gen else 0.0,
        }
        res["prompts"][str(k)] = prompts

    # chunk sweep and vision sharing, beside 3 generating streams
    bc = BatchChat(model, 4, slot_ctx)
    dr = _Driver(bc)
    streams: list = []

    def three_streams() -> None:
        """3 generating streams again (the synthetic model's sampling may end one with a stop token)."""
        for q in [q for q in streams if dr.state(q) != "generating"]:
            streams.remove(q)
        while len(streams) < 3:
            msgs, _ = _text(model, a["n_stream_prompt"], 500 + len(dr.reqs))
            streams.append(dr.track(BatchRequest(msgs, {"max_new_tokens": slot_ctx, "seed": 2000 + len(dr.reqs)})))
        dr.until(lambda: all(dr.state(q) == "generating" for q in streams))

    def alone_steps(n: int) -> list[float]:
        return [dr.step()["dt"] for _ in range(n)]

    base: list[float] = []
    for c in a["chunks"]:
        if c + 4 > bc.ctx.n_batch:
            res["chunk_note"] = f"chunk {c} skipped (n_batch {bc.ctx.n_batch})"
            continue
        bc.chunk = c  # read when a request is admitted (its prompt is cut into chunks then)
        three_streams()
        base += alone_steps(6)
        msgs, toks = _text(model, a["n_long"], 700 + c)
        long = dr.track(BatchRequest(msgs, {"max_new_tokens": 1, "seed": 3000 + c}))
        i0 = len(dr.steps)
        dr.until(lambda long=long: long.finished.is_set())
        if long.error is not None:
            raise long.error
        # the steps that admitted the prompt or decoded a chunk of it: what the streams waited per token then
        pre = [st["dt"] for st in dr.steps[i0:] if st["before"][id(long)] in ("waiting", "prefilling")]
        n_gen = min(sum(st["before"][id(q)] == "generating" for q in streams) for st in dr.steps[i0:])
        st = long.stats
        res["sweep"][str(c)] = {
            "step_s_median": median(pre),
            "step_s_max": max(pre),
            "steps": len(pre),
            "positions": st.tokens_prefilled,
            "prefill_s": st.prefill_ms / 1e3,
            "pos_per_s": st.tokens_prefilled / (st.prefill_ms / 1e3),
            "stream_tps": n_gen * len(pre) / sum(pre),
            "streams": n_gen,  # generating beside the prompt throughout (3 unless one stopped)
        }
    res["sweep_alone_step_s"] = median(base)
    from minicpmv.runtime.batch import CHUNK

    bc.chunk = CHUNK
    three_streams()
    alone = alone_steps(10)
    img = variant(Image.open(a["image"]).convert("RGB"), 7)
    ireq = dr.track(BatchRequest([{"role": "user", "content": [img, QUESTION]}], {"max_new_tokens": 1}))
    i0 = len(dr.steps)
    dr.until(lambda: dr.state(ireq) not in ("waiting", "encoding"))
    shared = [st["dt"] for st in dr.steps[i0:] if st["before"][id(ireq)] == "encoding"]
    n_shared = min((sum(st["before"][id(q)] == "generating" for q in streams) for st in dr.steps[i0:]), default=0)
    ireq.cancel()
    dr.until(lambda: ireq.finished.is_set())
    stream_tokens = [dr.count(q) for q in streams]
    for q in dr.reqs:
        q.cancel()
    dr.until(dr.idle)
    bc.close()
    vis = ireq.stats.vision_ms
    res["vision"] = {
        "alone_step_s": median(alone),
        "shared_step_s": median(shared) if shared else 0.0,
        "shared_step_max_s": max(shared) if shared else 0.0,
        "shared_steps": len(shared),
        "shared_vision_s": sum(vis) / 1e3,
        "shared_slices": len(vis),
        "shared_per_slice_s": sum(vis) / 1e3 / max(1, len(vis)),
        "alone_per_slice_s": sum(alone_ms) / 1e3 / max(1, len(alone_ms)),
        "streams": n_shared,  # generating throughout the vision phase (3 unless one stopped)
        "stream_tokens": stream_tokens,  # generated by each stream over the sweep and the vision phase
    }
    model.close()
    return res


def measure_image(a: dict) -> dict:
    """Time to first token of a short text arriving during an image question's prefill (4 slots)."""
    from PIL import Image

    from ..media import picture, variant

    MiniCPMV = ours.need("runtime", "MiniCPMV")
    BatchChat = ours.need("runtime.batch", "BatchChat")
    BatchRequest = ours.need("runtime.batch", "BatchRequest")
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_threads=a["threads"])
    bc = BatchChat(model, 4, a["slot_ctx"])
    dr = _Driver(bc)
    warm = dr.track(
        BatchRequest([{"role": "user", "content": [picture(448, 448, seed=2), QUESTION]}], {"max_new_tokens": 2})
    )
    dr.until(lambda: warm.finished.is_set())
    img = Image.open(a["image"]).convert("RGB")
    res: dict = {"cases": {}}
    for i, case in enumerate(("vision", "prefill")):
        ireq = dr.track(
            BatchRequest([{"role": "user", "content": [variant(img, 20 + i), QUESTION]}], {"max_new_tokens": 1})
        )
        msgs, _ = _text(model, a["n_text"], 900 + i)
        arrived: dict = {}

        def arrive(msgs=msgs, i=i, arrived=arrived, ireq=ireq) -> None:
            req = BatchRequest(msgs, {"max_new_tokens": 8, "seed": 4000 + i})  # its t_submit: the arrival
            arrived.update(req=req, state=dr.state(ireq))
            bc.submit(req)

        # the prefill case's text arrives a quarter into the image's LM prefill (as long as the first case's took),
        # from another thread: a request reaches a server at any moment of a step and waits for the rest of it
        ref = res["cases"]["vision"]["image_prefill_s"] if res["cases"] else 0.0
        treq = timer = None
        seqs: dict[int, int] = {}
        waited: list[bool] = []
        while treq is None or not (ireq.finished.is_set() and treq.finished.is_set()):
            st, sl = dr.state(ireq), dr.slot(ireq)
            if not arrived and timer is None:
                if (case == "vision" and st == "encoding") or st == "done":
                    arrive()  # the decode loop is idle while only the vision thread works
                elif case == "prefill" and (st == "prefilling" or (st == "encoding" and sl.vision.done())):
                    timer = threading.Timer(ref / 4, arrive)  # the next step starts the image's LM prefill
                    timer.start()
            if treq is None and arrived:
                treq = dr.adopt(arrived["req"])
                arrival, arrival_state = treq.t_submit, arrived["state"]
            rec = dr.step()
            if rec is not None and treq is not None and rec["before"].get(id(treq)) in ("waiting", "prefilling"):
                waited.append(id(ireq) in rec["chunk_of"])  # a step before the text's first token
            for q in (ireq, treq):
                if q is not None and dr.slot(q) is not None:
                    seqs[id(q)] = dr.slot(q).seq
        for q in (ireq, treq):
            if q.error is not None:
                raise q.error
        ist, tst = ireq.stats, treq.stats
        image_first = ireq.t_submit + ist.ttft_ms / 1e3
        res["cases"][case] = {
            "arrival_s": arrival - ireq.t_submit,
            "arrival_state": arrival_state,
            "text_ttft_s": tst.ttft_ms / 1e3,
            "text_prompt_tokens": tst.prompt_tokens,
            "text_tokens": len(treq.answer.tokens),
            "image_ttft_s": ist.ttft_ms / 1e3,
            "image_remaining_s": image_first - arrival,
            "image_vision_s": sum(ist.vision_ms) / 1e3,
            "image_slices": len(ist.vision_ms),
            "image_prefill_s": ist.prefill_ms / 1e3,
            "image_positions": ist.tokens_prefilled,
            "slots": [seqs.get(id(ireq)), seqs.get(id(treq))],  # which slot each request was given
            "text_steps": len(waited),  # steps after the one in flight at its arrival, to its first token
            "image_chunks_meanwhile": sum(waited),  # of which decoded a chunk of the image
        }
    bc.close()
    model.close()
    return res


def measure_llama(a: dict) -> dict:
    """llama-server -np k for k = 1, 2, 4: the same prompt tokens, concurrent streamed /completion requests."""
    from pathlib import Path

    from ..llama_server import LlamaServer

    res: dict = {"decode": {}}
    for k_str, prompts in a["prompts"].items():
        k = int(k_str)
        try:
            srv = LlamaServer(Path(a["binary"]), a["lm"], k, a["slot_ctx"], a["threads"], Path(a["log"]))
        except RuntimeError as e:
            raise Skip(f"llama-server: {e}") from None
        try:
            srv.concurrent([{"prompt": prompts[0][:16], "n_predict": 4, "cache_prompt": False}])  # warm-up
            bodies = [
                {"prompt": p, "n_predict": a["n_gen"], "seed": 1000 + i, "cache_prompt": False} | SAMPLING
                for i, p in enumerate(prompts)
            ]
            out = srv.concurrent(bodies)
            rss = srv.peak_rss_gb()
        finally:
            srv.close()
        agg = aggregate([o["marks"] for o in out])
        res["decode"][k_str] = agg | {
            "n_gen": [o["n_gen"] for o in out],
            "prompt_tokens": [o["tokens_evaluated"] for o in out],
            "stop_type": [o["stop_type"] for o in out],
            "server_tps_sum": sum(o["timings"].get("predicted_per_second", 0.0) for o in out),
            "load_s": srv.load_s,
            "peak_rss_gb": rss,
        }
        if k == 4:
            res["rss_np4_gb"] = rss
    return res


def step_reading(steps: dict[int, float]) -> str:
    """What the step times say about the 4-stream speed-up, from this run's figures: llama.cpp's
    repacked Q4_K kernels multiply 4 rows at a time and take the rows left over one at a time
    (ggml-cpu/repack.cpp), so whether padding 3 rows to 4 would pay depends on the CPU."""
    four_vs_one = steps[4] / steps[1]
    out = (
        f"A step of 4 rows costs {four_vs_one:.2f}x a step of 1, so 4 streams decode about "
        f"{4 / four_vs_one:.2f}x as many tokens per second as one here: llama.cpp's repacked Q4_K kernels "
        "(ggml-cpu/repack.cpp) take 4 rows at a time and the CPU's 2 cores are compute-bound on them, for "
        "llama-server as for us. "
    )
    if steps[3] > steps[4]:
        return out + (
            f"A 3-row step costs more than a 4-row one ({steps[3] * 1e3:.0f} vs {steps[4] * 1e3:.0f} ms: the "
            "rows left over from the 4-row blocks go one at a time), so padding 3 streams to 4 rows would pay "
            "on this CPU."
        )
    return out + (
        f"A 3-row step costs less than a 4-row one ({steps[3] * 1e3:.0f} vs {steps[4] * 1e3:.0f} ms), so padding "
        "3 streams to 4 rows would not pay on this CPU."
    )
