"""One measured step, run in its own process by bench.common.run_worker:

    python -m bench.worker TASK 'JSON-ARGS' OUT.json

Loads happen outside the timed regions; runs of the two sides are interleaved (ours, llama.cpp,
ours, ...) so that a load spike from elsewhere hits both. Every figure is a list over runs; the
parent takes medians and ratios.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .common import Skip
from . import lowbit, ours

QUESTION = "What is in the image? Describe the shapes and their colours."
VIDEO_QUESTION = "Describe the video."


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


# --------------------------------------------------------------------------- conversion

def convert_onepass(a: dict) -> dict:
    from minicpmv.convert.pipeline import convert
    t0 = time.perf_counter()
    r = convert(Path(a["ckpt"]), Path(a["out"]), quant_type=a.get("quant", "Q4_K_M"), mmproj_type=a.get("mmproj", "f16"),
                threads=a.get("threads"), progress=False, force=True,
                write_mmproj=a.get("write_mmproj", True), write_lm=a.get("write_lm", True))
    return {"seconds": time.perf_counter() - t0, "lm": str(r.lm_path) if r.lm_path else None,
            "mmproj": str(r.mmproj_path) if r.mmproj_path else None}


def convert_bf16(a: dict) -> dict:
    return convert_onepass({**a, "quant": "BF16", "write_mmproj": False})


def llama_quantize(a: dict) -> dict:
    t0 = time.perf_counter()
    try:
        from minicpmv.quant import quantize_model_with_llama_cpp as q
    except ImportError:
        from minicpmv.quant.llama_quantize import quantize_model_with_llama_cpp as q
    q(Path(a["src"]), Path(a["dst"]), a.get("type", "Q4_K_M"), nthread=a["threads"])
    return {"seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- vision

def vision(a: dict) -> dict:
    from .llamacpp import BareLM, MtmdPipeline
    from .media import picture
    VisionEncoder = ours.need("runtime.vision", "VisionEncoder")
    slice_image = ours.need("runtime.image", "slice_image")
    T, runs = a["threads"], a["runs"]
    img = picture(448, 448, seed=1)
    pixels = slice_image(img).pixel_values()
    assert len(pixels) == 1 and pixels[0].shape == (3, 448, 448)

    lm = BareLM(a["lm"], n_ctx=512, n_threads=T, vocab_only=True)
    mt = MtmdPipeline(lm, a["mmproj"], n_threads=T, warmup=True)
    chunks = mt.tokenize(chatml_marker_only(), [np.asarray(img)])
    encs = {}
    load_s = {}
    for dt in a.get("dtypes", ["bf16", "f32"]):
        t0 = time.perf_counter()
        encs[dt] = VisionEncoder.load(a["mmproj"], dtype=dt, n_threads=T)
        load_s[dt] = time.perf_counter() - t0

    def run_mtmd() -> float:
        t0 = time.perf_counter()
        n = mt.encode_images(chunks)
        assert n == 1, f"mtmd made {n} chunks of a 448x448 image"
        return time.perf_counter() - t0

    def run_ours(dt: str) -> float:
        t0 = time.perf_counter()
        out = encs[dt].encode_slices([pixels[0]])
        _ = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
        return time.perf_counter() - t0

    for _ in range(a.get("warmup", 1)):
        run_mtmd()
        for dt in encs:
            run_ours(dt)
    res = {"mtmd_s": [], **{f"ours_{dt}_s": [] for dt in encs}}
    for _ in Runs(runs, a.get("budget_s")):
        res["mtmd_s"].append(run_mtmd())
        for dt in encs:
            res[f"ours_{dt}_s"].append(run_ours(dt))
    res["weights_nbytes"] = {dt: int(getattr(e, "weights_nbytes", 0) or 0) for dt, e in encs.items()}
    res["load_s"] = load_s
    res["mmproj_file_bytes"] = Path(a["mmproj"]).stat().st_size
    mt.free_chunks(chunks)
    mt.close()
    lm.close()
    return res


def chatml_marker_only() -> str:
    from .llamacpp import marker
    return marker()


# --------------------------------------------------------------------------- language model

def _words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = ("the model reads a long document about rivers mountains cities weather music history "
             "science gardens machines languages numbers colours animals stories markets travel").split()
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def _prompt_text(lm, n_prompt: int, run: int) -> tuple[str, list[int]]:
    """A user text whose chat prompt is n_prompt tokens (or a token or two less: BPE merges make
    some lengths unreachable). It starts with the run number so that no two runs share a KV-cache
    prefix beyond the first few tokens."""
    def make(k: int) -> tuple[str, list[int]]:
        text = f"Run {run}: " + _words(k, run)
        return text, lm.tokenize(chatml(text))

    lo, hi = 1, n_prompt          # largest word count whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(make(mid)[1]) <= n_prompt:
            lo = mid
        else:
            hi = mid - 1
    text, toks = make(lo)
    while len(toks) < n_prompt:    # pad one short token at a time
        t2 = lm.tokenize(chatml(text + " a"))
        if len(t2) > n_prompt:
            break
        text, toks = text + " a", t2
    return text, toks


def llm(a: dict) -> dict:
    from .llamacpp import BareLM
    MiniCPMV = ours.need("runtime", "MiniCPMV")
    T, runs, n_prompt, n_gen = a["threads"], a["runs"], a["n_prompt"], a["n_gen"]
    n_ctx = a.get("n_ctx", 2048)
    bare = BareLM(a["lm"], n_ctx=n_ctx, n_threads=T)
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=n_ctx, n_threads=T)

    def bare_once(toks: list[int], n: int) -> tuple[float, float, int]:
        bare.clear()
        t0 = time.perf_counter()
        pos = bare.prefill(toks)
        t_pre = time.perf_counter()
        out, t_first = bare.generate(pos, n)
        t_end = time.perf_counter()
        ttft = (t_pre - t0) + t_first
        return ttft, t_end - t0, len(out)

    def ours_once(text: str, n: int) -> tuple[float, float, int, dict]:
        ours.reset(model)
        r = ours.timed_chat(model, [{"role": "user", "content": [text]}], max_new_tokens=n)
        n_out = gen_count(r.counters, r.n_pieces)
        return r.ttft_s, r.total_s, n_out, r.counters

    # warm-up: page the weights in and spin up the thread pools on both sides
    wtext, wtoks = _prompt_text(bare, 64, 999)
    bare_once(wtoks, 4)
    ours_once(wtext, 4)
    res: dict = {k: [] for k in ("bare_prefill_tps", "bare_decode_tps", "ours_prefill_tps", "ours_decode_tps")}
    res["ours_counters"] = []
    res["n_prompt"] = []
    for r in Runs(runs, a.get("budget_s")):
        text, toks = _prompt_text(bare, n_prompt, r)
        ttft, total, n_out = bare_once(toks, n_gen)
        res["bare_prefill_tps"].append(len(toks) / ttft)
        res["bare_decode_tps"].append((n_out - 1) / (total - ttft))
        ttft, total, n_out, counters = ours_once(text, n_gen)
        n_p = prompt_count(counters) or len(toks)
        res["ours_prefill_tps"].append(n_p / ttft)
        # ours decodes every sampled token (the last one too, so the KV cache holds the whole turn
        # for the next one): n_out decode calls after the first token; the bare loop makes n - 1
        res["ours_decode_tps"].append(n_out / (total - ttft) if n_out > 0 else 0.0)
        res["ours_counters"].append(counters)
        res["n_prompt"].append([len(toks), n_p])
        res.setdefault("n_gen", []).append([n_gen, n_out])
    bare.close()
    return res


def gen_count(counters: dict, fallback: int) -> int:
    for k in ("decode_tokens",):
        if isinstance(counters.get(k), int):
            return counters[k]
    return fallback


def prompt_count(counters: dict) -> int | None:
    for k in ("tokens_prefilled", "prompt_tokens"):
        if isinstance(counters.get(k), int):
            return counters[k]
    return None


# --------------------------------------------------------------------------- end to end (image)

def e2e(a: dict) -> dict:
    from .llamacpp import BareLM, MtmdPipeline
    from .media import picture, variant
    from PIL import Image
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
        mt = MtmdPipeline(bare, a["mmproj"], n_threads=T, warmup=True)
        res["mtmd_load_s"] = time.perf_counter() - t0
    prompt = chatml(f"{chatml_marker_only()}\n{QUESTION}")

    def ours_once(im, n: int):
        ours.reset(model)
        r = ours.timed_chat(model, [{"role": "user", "content": [im, QUESTION]}], max_new_tokens=n)
        return r.ttft_s, r.total_s, gen_count(r.counters, r.n_pieces), r.counters

    def mtmd_once(im, n: int):
        bare.clear()
        t0 = time.perf_counter()
        chunks = mt.tokenize(prompt, [np.asarray(im)])
        n_tok = mt.n_tokens(chunks)
        n_past = mt.eval_chunks(chunks)
        t_eval = time.perf_counter()
        out, t_first = bare.generate(n_past, n)
        t_end = time.perf_counter()
        mt.free_chunks(chunks)
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

        def run_ours():
            ttft, total, n_out, counters = ours_once(im, n_gen)
            res["ours_ttft_s"].append(ttft)
            res["ours_total_s"].append(total)
            res["ours_counters"].append(counters)
            res["n_gen"].append(n_out)

        def run_mtmd():
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


# --------------------------------------------------------------------------- video

def video(a: dict) -> dict:
    """60 s video: ours with temporal packing vs one frame per image (what mtmd does).

    Vision and prefill are measured on the first `subset` frames of the sampled sequence (a whole
    number of groups) and scaled linearly to the whole video; token counts are exact."""
    from .llamacpp import BareLM, MtmdPipeline, marker
    load_video = ours.need("runtime.video", "load_video")
    MiniCPMV = ours.need("runtime", "MiniCPMV")
    T, n_ctx, packing = a["threads"], a.get("n_ctx", 4096), a["packing"]
    t0 = time.perf_counter()
    v = load_video(a["video"], fps=a["fps"], packing=packing)
    frames, groups = video_parts(v)
    res: dict = {"decode_s": time.perf_counter() - t0, "n_frames": len(frames), "n_groups": len(groups)}
    k_groups = max(1, min(len(groups), a["subset"] // packing))
    k_frames = sum(len(g) for g in groups[:k_groups])
    res["subset_frames"], res["subset_groups"] = k_frames, k_groups

    model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=n_ctx, n_threads=T)
    # exact LM token counts of the whole video, both ways
    res["ours_tokens"] = count_prompt_tokens(model, frames, groups, VIDEO_QUESTION)
    bare = BareLM(a["lm"], n_ctx=n_ctx, n_threads=T)
    mt = MtmdPipeline(bare, a["mmproj"], n_threads=T, warmup=True)
    arrays = [np.asarray(f.convert("RGB")) for f in frames]
    chunks = mt.tokenize(chatml(marker() * len(arrays) + "\n" + VIDEO_QUESTION), arrays)
    res["mtmd_tokens"] = mt.n_tokens(chunks)
    mt.free_chunks(chunks)

    # warm-up, both sides: one frame through the whole pipeline
    warm = [{"role": "user", "content": [frames[0], VIDEO_QUESTION]}]
    ours.timed_chat(model, warm, max_new_tokens=1, use_image_id=False, max_slice_nums=1, temporal_ids=[[groups[0][0]]])
    wch = mt.tokenize(chatml(marker() + "\n" + VIDEO_QUESTION), arrays[:1])
    mt.eval_chunks(wch)
    mt.free_chunks(wch)

    # measured: the first k frames, both ways, time to first token with one generated token
    ours.reset(model)
    msgs = [{"role": "user", "content": list(frames[:k_frames]) + [VIDEO_QUESTION]}]
    r = ours.timed_chat(model, msgs, max_new_tokens=1, use_image_id=False, max_slice_nums=1,
                        temporal_ids=groups[:k_groups])
    res["ours_subset_ttft_s"] = r.ttft_s
    res["ours_subset_counters"] = r.counters
    res["ours_subset_tokens"] = prompt_count(r.counters) or count_prompt_tokens(model, frames[:k_frames], groups[:k_groups], VIDEO_QUESTION)
    res["ours_subset_vision_s"] = vision_seconds(r.counters)

    import llama_cpp.mtmd_cpp as M
    import llama_cpp as L
    bare.clear()
    sub = mt.tokenize(chatml(marker() * k_frames + "\n" + VIDEO_QUESTION), arrays[:k_frames])
    t0 = time.perf_counter()
    vis = 0.0
    n_past = 0
    n_chunks = M.mtmd_input_chunks_size(sub)
    for i in range(n_chunks):
        ch = M.mtmd_input_chunks_get(sub, i)
        new = L.llama_pos(n_past)   # the helper adds to it
        last = i == n_chunks - 1
        if M.mtmd_input_chunk_get_type(ch) == 1:
            ta = time.perf_counter()
            if M.mtmd_encode_chunk(mt.ctx, ch) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            vis += time.perf_counter() - ta
            rc = M.mtmd_helper_decode_image_chunk(mt.ctx, bare.ctx, ch, M.mtmd_get_output_embd(mt.ctx), n_past, 0,
                                                  bare.n_batch, ctypes_byref(new),
                                                  M.mtmd_helper_post_decode_callback(0), None)
        else:
            rc = M.mtmd_helper_eval_chunk_single(mt.ctx, bare.ctx, ch, n_past, 0, bare.n_batch, last, ctypes_byref(new))
        if rc != 0:
            raise RuntimeError(f"mtmd chunk {i} failed ({rc})")
        n_past = int(new.value)
    bare.generate(n_past, 1)
    res["mtmd_subset_ttft_s"] = time.perf_counter() - t0
    res["mtmd_subset_vision_s"] = vis
    res["mtmd_subset_tokens"] = n_past
    mt.free_chunks(sub)
    mt.close()
    bare.close()
    return res


def ctypes_byref(x):
    import ctypes
    return ctypes.byref(x)


def video_parts(v) -> tuple[list, list[list[int]]]:
    """(frames, temporal-id groups) from whatever load_video returns."""
    if isinstance(v, tuple):
        frames, groups = v[0], v[1]
    else:
        frames = getattr(v, "frames")
        groups = getattr(v, "temporal_ids", None) or getattr(v, "groups")
    return list(frames), [list(g) for g in groups]


def vision_seconds(counters: dict) -> float | None:
    for k, scale in (("vision_ms_total", 1e-3),):
        if isinstance(counters.get(k), (int, float)):
            return counters[k] * scale
    return None


def count_prompt_tokens(model, frames, groups, question: str) -> int:
    """Positions of the video prompt as our runtime builds it (text tokens + 64 per slot),
    without running the model."""
    prompt = model.build_prompt([{"role": "user", "content": list(frames) + [question]}], use_image_id=False,
                                max_slice_nums=1, temporal_ids=groups)
    return len(model.prompt_token_ids(prompt))


def proc_status() -> dict:
    """Resident memory of this process now (GB): total, anonymous, file-backed (mmapped files)."""
    import re
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 / 1e9
            for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile") if re.search(rf"{k}:", text)}


def rss_after_load(a: dict) -> dict:
    """Where the memory goes right after MiniCPMV.load (no inference): what explains the CLI's peak."""
    MiniCPMV = ours.need("runtime", "MiniCPMV")
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=a.get("n_ctx", 4096), n_threads=a["threads"])
    out = proc_status()
    out["vision_weights_gb"] = getattr(model.vision, "weights_nbytes", 0) / 1e9
    return out


TASKS = {f.__name__: f for f in (convert_onepass, convert_bf16, llama_quantize, vision, llm, e2e, video,
                                  rss_after_load)} | lowbit.TASKS


def main() -> int:
    task, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    try:
        res = TASKS[task](args)
    except Skip as e:
        res = {"skip": str(e)}
    out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
