"""§5 Sizes on disk, and the peak RSS of one image question through the CLI vs mtmd's pipeline."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .. import ours
from ..common import GB, BenchError, Skip, dir_bytes, log_tail, run_cmd
from ..report import row, vars_m
from ..session import Session


def run(bench: Session) -> dict:
    s = bench.scale
    for label, p in (("synthetic bf16 checkpoint (safetensors)", bench.ckpt),
                     ("Q4_K_M LM GGUF, ours (one pass)", bench.lm), ("f16 mmproj GGUF", bench.mmproj)):
        if p.exists():
            bench.sizes.setdefault(label, dir_bytes(p))
    z = {k: v / GB for k, v in bench.sizes.items()}
    rows = [row("size: synthetic bf16 checkpoint (safetensors, input of both)", z.get("synthetic bf16 checkpoint (safetensors)"), None, unit="GB"),
            row("size: BF16 LM GGUF (two-step intermediate)", None, z.get("BF16 LM GGUF (two-step intermediate)"), unit="GB"),
            row("size: Q4_K_M LM GGUF", z.get("Q4_K_M LM GGUF, ours (one pass)"),
                z.get("Q4_K_M LM GGUF, llama_model_quantize"), unit="GB"),
            row("size: f16 mmproj GGUF", z.get("f16 mmproj GGUF"), None, unit="GB",
                note="same file used by both sides")]
    notes = []
    image = bench.image()
    cli = cli_command()
    rss_ours = None
    if cli is None:
        notes.append("minicpm-run: not run (minicpmv.cli.run is not available)")
    else:
        cmd = cli + [str(image), "What is in the image?", "--model", str(bench.lm), "--mmproj", str(bench.mmproj),
                     "--ctx", "4096", "--threads", str(bench.threads), "--max-tokens", str(s.e2e_gen), "--json"]
        rc, wall, rss_ours = bench.step("sizes:minicpm-run", run_cmd, cmd, log=bench.log)
        if rc != 0:
            notes.append(f"minicpm-run failed (exit {rc}); log {bench.log}: {log_tail(bench.log, 3).strip()}")
            rss_ours = None
        else:
            notes.append(f"minicpm-run wall time {wall:.1f} s (load + encode + prefill + {s.e2e_gen} tokens).")
    m = bench.worker("e2e", {"lm": str(bench.lm), "mmproj": str(bench.mmproj), "image": str(image),
                            "threads": bench.threads, "runs": 1, "n_gen": s.e2e_gen, "n_ctx": 4096,
                            "warmup": 0, "sides": ["mtmd"]})
    rows.append(row("peak RSS, 1344x1344 question, Q4_K_M + f16 mmproj, ctx 4096", rss_ours, m.peak_rss_gb,
                    unit="GB", target="ours <= 7 GB", met=(rss_ours <= 7.0) if rss_ours is not None else None))
    try:
        mem = bench.worker("rss_after_load", {"lm": str(bench.lm), "mmproj": str(bench.mmproj),
                                             "threads": bench.threads, "n_ctx": 4096}).result
        notes.append(f"ours right after `MiniCPMV.load` (ctx 4096, before any inference): resident "
                     f"{mem['VmRSS']:.2f} GB = {mem['RssAnon']:.2f} GB anonymous (vision weights "
                     f"{mem['vision_weights_gb']:.2f} GB, llama.cpp's buffers, KV cache) + {mem['RssFile']:.2f} GB of "
                     f"mmapped files (the LM GGUF {bench.lm.stat().st_size / GB:.2f} GB).")
    except (BenchError, Skip) as e:
        notes.append(f"memory breakdown after load: not measured ({str(e).splitlines()[0]})")
    notes.append("llama.cpp figure: llama-mtmd-cli cannot be built from llama-cpp-python's sources here, so its "
                 "pipeline (`mtmd_tokenize` + `mtmd_helper_eval_chunks` + decode loop, same files, ctx 4096, "
                 "same threads) runs in a subprocess and its peak RSS is reported; llama-mtmd-cli itself "
                 "peaks near 10 GB on this job. Peak RSS = the subprocess's ru_maxrss (os.wait4).")
    return {"rows": rows, "notes": notes, "raw": {"sizes": bench.sizes, "mtmd_subprocess": vars_m(m)}}


def cli_command() -> list[str] | None:
    try:
        import minicpmv.cli.run  # noqa: F401
    except ImportError:
        return None
    exe = shutil.which("minicpm-run")
    return [exe] if exe else [sys.executable, "-c", "import sys; from minicpmv.cli.run import main; sys.exit(main())"]


# --------------------------------------------------------------------------- measured (bench.worker)

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
