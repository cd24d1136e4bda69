"""§2 Vision encoder: one 448x448 slice, ours (bf16 and f32 compute) vs mtmd's clip on the same f16 mmproj."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import ours
from ..common import GB, median
from ..measure import Runs
from ..report import fmt_list, row
from ..session import Session


def run(bench: Session) -> dict:
    m = bench.worker(
        "vision",
        {
            "lm": str(bench.lm),
            "mmproj": str(bench.mmproj),
            "threads": bench.threads,
            "runs": bench.runs,
            "warmup": 1,
            "budget_s": bench.runs_budget("vision"),
        },
    )
    r = m.result
    mt = r["mtmd_s"]
    rows = []
    for dt_, target in (("bf16", 0.4), ("f32", 0.9)):
        o = r[f"ours_{dt_}_s"]
        ratio = median([a / b for a, b in zip(o, mt)])
        rows.append(
            row(
                f"seconds per slice, ours {dt_} compute",
                median(o),
                median(mt),
                unit="s",
                ratio=ratio,
                target=f"<= {target}x",
                met=ratio <= target,
            )
        )
    wb = r["weights_nbytes"]
    for dt_ in ("bf16", "f32"):
        if wb.get(dt_):
            rows.append(
                row(
                    f"vision weights resident, ours {dt_}",
                    wb[dt_] / GB,
                    r["mmproj_file_bytes"] / GB,
                    unit="GB",
                    note="llama.cpp: the f16 mmproj's tensors",
                )
            )
    notes = [
        f"same f16 mmproj, {bench.threads} threads both; mtmd = `mtmd_encode_chunk` of a 448x448 image "
        "(one chunk, 1024 patches); ours = `VisionEncoder.encode_slices` of the same pixels; preprocessing "
        "excluded on both sides.",
        f"{len(mt)} runs after 1 warm-up; per-run seconds: mtmd {fmt_list(mt)}, bf16 "
        f"{fmt_list(r['ours_bf16_s'])}, f32 {fmt_list(r['ours_f32_s'])}; load time of ours "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r["load_s"].items())
        + ".",
        f"vision worker peak RSS {m.peak_rss_gb:.2f} GB (both of our encoders and mtmd loaded together).",
    ]
    fl = r.get("floor")
    if fl:
        floor_s = fl["gflop"] / fl["gflops"]
        notes.append(
            f"bf16 floor: one slice is {fl['gflop']:.0f} GFLOP of matrix products (tower "
            f"{fl['tower_gflop']:.0f}, of which attention {fl['attention_gflop']:.0f}; resampler "
            f"{fl['resampler_gflop']:.0f}); this CPU multiplies bf16 matrices at {fl['gflops']:.0f} GFLOPS "
            f"(torch.mm {fl['shape']}, {bench.threads} threads, best of {fl['reps']}), so the products alone "
            f"take {floor_s:.2f} s = {floor_s / median(mt):.3f}x mtmd's median; ours bf16 is "
            f"{median(r['ours_bf16_s']) / floor_s:.2f}x that floor (softmax, LayerNorms and the float32 "
            "residual stream are the rest)."
        )
    return {"rows": rows, "notes": notes, "raw": r}


# --------------------------------------------------------------------------- measured (bench.worker)


def measure(a: dict) -> dict:
    from tests.mtmd import Mtmd

    from ..llamacpp import BareLM
    from ..media import picture

    VisionEncoder = ours.need("runtime.vision", "VisionEncoder")
    slice_image = ours.need("runtime.image", "slice_image")
    T, runs = a["threads"], a["runs"]
    img = picture(448, 448, seed=1)
    pixels = slice_image(img).pixel_values()
    assert len(pixels) == 1 and pixels[0].shape == (3, 448, 448)

    lm = BareLM(a["lm"], n_ctx=512, n_threads=T, vocab_only=True)
    mt = Mtmd(a["mmproj"], lm.lm, n_threads=T, warmup=True)
    chunks = mt.tokenize([np.asarray(img)])
    encs = {}
    load_s = {}
    for dt in a.get("dtypes", ["bf16", "f32"]):
        t0 = time.perf_counter()
        encs[dt] = VisionEncoder.load(a["mmproj"], dtype=dt, n_threads=T)
        load_s[dt] = time.perf_counter() - t0

    def run_mtmd() -> float:
        t0 = time.perf_counter()
        n = chunks.encode_images()
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
    if "bf16" in encs:
        hp = encs["bf16"].hparams
        res["floor"] = matmul_floor(hp, pixels[0].shape[1] // hp.patch_size, T)
    res["weights_nbytes"] = {dt: int(getattr(e, "weights_nbytes", 0) or 0) for dt, e in encs.items()}
    res["load_s"] = load_s
    res["mmproj_file_bytes"] = Path(a["mmproj"]).stat().st_size
    chunks.free()
    mt.close()
    lm.close()
    return res


def matmul_floor(hp, side: int, threads: int, reps: int = 5) -> dict:
    """The matrix-product work of one side x side-patch slice through our bf16 encoder and this
    CPU's bf16 matrix-multiply rate: what no bf16 implementation of the same math can beat."""
    import torch

    n, d, f, D = side * side, hp.n_embd, hp.n_ff, hp.embed_dim
    hq = hp.n_head_resampler * hp.query_num
    linears = 2 * n * (d * 3 * d + d * d + d * f + f * d)  # qkv, out, fc1, fc2
    attention = 2 * 2 * n * n * d  # QK^T and PV over all heads
    tower = hp.n_layer * (linears + attention) + 2 * n * 3 * hp.patch_size**2 * d
    # the resampler folded onto the features (runtime/vision_weights.fold_resampler): the Gram form
    # of the kv rows' variance, the feature and position scores, P f, per-head values, out and proj
    resampler = 2 * n * d * d + 2 * n * d * hq + 2 * 2 * side * (D // 2) * hq + 2 * hq * n * d
    resampler += 2 * hq * d * (D // hp.n_head_resampler) + 2 * 2 * hp.query_num * D * D
    torch_threads = ours.need("runtime.vision_threads", "torch_threads")
    a, b = torch.randn(n, d).bfloat16(), torch.randn(d, f).bfloat16()
    with torch_threads(threads):
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return {
        "gflop": (tower + resampler) / 1e9,
        "tower_gflop": tower / 1e9,
        "attention_gflop": hp.n_layer * attention / 1e9,
        "resampler_gflop": resampler / 1e9,
        "gflops": 2 * n * d * f / best / 1e9,
        "shape": f"[{n}x{d}] x [{d}x{f}]",
        "reps": reps,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
