"""§1 Conversion: our one pass (HF -> Q4_K_M LM + f16 mmproj) vs llama.cpp's two steps (our HF -> BF16
GGUF, then llama_model_quantize), wall time, peak RSS, and whether the tensors come out identical."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from ..common import evict_page_cache
from ..report import row, vars_m
from ..session import LM_NAME, MMPROJ_NAME, Session


def run(bench: Session) -> dict:
    T = bench.threads
    one = bench.work / "onepass"
    two = bench.work / "twostep"
    shutil.rmtree(two, ignore_errors=True)
    for f in (one / LM_NAME, one / MMPROJ_NAME):
        f.unlink(missing_ok=True)
    evict_page_cache(bench.ckpt)
    m1 = bench.worker("convert_onepass", {"ckpt": str(bench.ckpt), "out": str(one), "threads": T})
    bench.sizes["Q4_K_M LM GGUF, ours (one pass)"] = Path(m1.result["lm"]).stat().st_size
    bench.sizes["f16 mmproj GGUF"] = Path(m1.result["mmproj"]).stat().st_size
    evict_page_cache(bench.ckpt)
    try:
        m2 = bench.worker("convert_bf16", {"ckpt": str(bench.ckpt), "out": str(two), "threads": T})
        bf16 = Path(m2.result["lm"])
        bench.sizes["BF16 LM GGUF (two-step intermediate)"] = bf16.stat().st_size
        llama_q4 = two / "llama-Q4_K_M.gguf"
        m3 = bench.worker("llama_quantize", {"src": str(bf16), "dst": str(llama_q4), "threads": T})
        bf16.unlink()  # free 16 GB as soon as it is measured
        bench.sizes["Q4_K_M LM GGUF, llama_model_quantize"] = llama_q4.stat().st_size
        # in a worker: reading both 5 GB files would leave the parent (and so, through fork, every
        # later subprocess's ru_maxrss) that large
        same = bench.worker("compare", {"a": m1.result["lm"], "b": str(llama_q4)}).result["same"]
    finally:
        shutil.rmtree(two, ignore_errors=True)  # the two-step files are not needed later

    t_one = m1.result["seconds"]
    t_two = m2.result["seconds"] + m3.result["seconds"]
    rss_two = max(m2.peak_rss_gb, m3.peak_rss_gb)
    rows = [
        row(
            "wall time",
            t_one,
            t_two,
            unit="s",
            target="< 1x (faster)",
            met=t_one < t_two,
            note="one pass also writes the f16 mmproj",
        ),
        row("peak RSS", m1.peak_rss_gb, rss_two, unit="GB", target="ours < 3 GB", met=m1.peak_rss_gb < 3.0),
    ]
    notes = [
        "One run per path (each takes minutes at full size); the checkpoint's pages are evicted from the page "
        "cache (posix_fadvise DONTNEED) before each path, so both read it cold.",
        f"two-step = our HF -> BF16 GGUF ({m2.result['seconds']:.1f} s, peak {m2.peak_rss_gb:.2f} GB) + "
        f"llama_model_quantize BF16 -> Q4_K_M with {T} threads ({m3.result['seconds']:.1f} s, peak "
        f"{m3.peak_rss_gb:.2f} GB); its peak RSS is the larger of the two steps.",
        f"one pass = HF -> Q4_K_M LM + f16 mmproj, {T} threads; subprocess wall incl. interpreter start "
        f"{m1.wall_s:.1f} s.",
        f"tensor data of our Q4_K_M vs llama_model_quantize's: {same}.",
        "peak RSS = the measuring subprocess's own high-water mark (VmHWM, bench/peak.py), which counts the "
        "pages of mmapped files it touched (llama_model_quantize maps its input).",
    ]
    return {"rows": rows, "notes": notes, "raw": {"onepass": vars_m(m1), "bf16": vars_m(m2), "quantize": vars_m(m3)}}


def compare_tensors(a: Path, b: Path) -> str:
    """Whether two GGUFs hold the same tensors with the same types and bytes."""
    import gguf

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if set(ta) != set(tb):
        return f"different tensor names ({len(set(ta) ^ set(tb))} differ)"
    bad = [
        n
        for n in ta
        if ta[n].tensor_type != tb[n].tensor_type
        or hashlib.sha1(ta[n].data.tobytes()).digest() != hashlib.sha1(tb[n].data.tobytes()).digest()
    ]
    if bad:
        return f"{len(bad)} of {len(ta)} tensors differ (first: {bad[0]})"
    return f"identical types and bytes for all {len(ta)} tensors"


# --------------------------------------------------------------------------- measured (bench.worker)


def compare(a: dict) -> dict:
    return {"same": compare_tensors(Path(a["a"]), Path(a["b"]))}


def convert_onepass(a: dict) -> dict:
    from minicpmv.convert.pipeline import convert

    t0 = time.perf_counter()
    r = convert(
        Path(a["ckpt"]),
        Path(a["out"]),
        quant_type=a.get("quant", "Q4_K_M"),
        mmproj_type=a.get("mmproj", "f16"),
        threads=a.get("threads"),
        progress=False,
        force=True,
        write_mmproj=a.get("write_mmproj", True),
        write_lm=a.get("write_lm", True),
    )
    return {
        "seconds": time.perf_counter() - t0,
        "lm": str(r.lm_path) if r.lm_path else None,
        "mmproj": str(r.mmproj_path) if r.mmproj_path else None,
    }


def convert_bf16(a: dict) -> dict:
    return convert_onepass({**a, "quant": "BF16", "write_mmproj": False})


def llama_quantize(a: dict) -> dict:
    t0 = time.perf_counter()
    try:
        from minicpmv.quant import quantize_model_with_llama_cpp as q
    except ImportError:
        from tests.llama_quantize import quantize_model_with_llama_cpp as q
    q(Path(a["src"]), Path(a["dst"]), a.get("type", "Q4_K_M"), nthread=a["threads"])
    return {"seconds": time.perf_counter() - t0}
