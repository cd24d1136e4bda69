"""§5 Sizes on disk of the checkpoint and of the files both sides run."""

from __future__ import annotations

import sys

from ..common import GB, dir_bytes
from ..report import row
from ..session import Session


def run(bench: Session) -> dict:
    for label, p in (
        ("synthetic bf16 checkpoint (safetensors)", bench.ckpt),
        ("Q4_K_M LM GGUF, ours (one pass)", bench.lm),
        ("f16 mmproj GGUF", bench.mmproj),
    ):
        if p.exists():
            bench.sizes.setdefault(label, dir_bytes(p))
    z = {k: v / GB for k, v in bench.sizes.items()}
    rows = [
        row(
            "size: synthetic bf16 checkpoint (safetensors, input of both)",
            z.get("synthetic bf16 checkpoint (safetensors)"),
            None,
            unit="GB",
        ),
        row(
            "size: BF16 LM GGUF (two-step intermediate)", None, z.get("BF16 LM GGUF (two-step intermediate)"), unit="GB"
        ),
        row(
            "size: Q4_K_M LM GGUF",
            z.get("Q4_K_M LM GGUF, ours (one pass)"),
            z.get("Q4_K_M LM GGUF, llama_model_quantize"),
            unit="GB",
        ),
        row("size: f16 mmproj GGUF", z.get("f16 mmproj GGUF"), None, unit="GB", note="same file used by both sides"),
    ]
    notes = ["peak memory: §5b."]
    return {"rows": rows, "notes": notes, "raw": {"sizes": bench.sizes}}


def cli_command() -> list[str] | None:
    try:
        import minicpmv.cli.run  # noqa: F401
    except ImportError:
        return None
    # what the minicpm-run script runs, with bench.peak imported first to report the peak RSS
    return [sys.executable, "-c", "import sys, bench.peak; from minicpmv.cli.run import main; sys.exit(main())"]
