"""One measured step, run in its own process by bench.common.run_worker:

    python -m bench.worker TASK 'JSON-ARGS' OUT.json

Loads happen outside the timed regions; runs of the two sides are interleaved (ours, llama.cpp,
ours, ...) so that a load spike from elsewhere hits both. Every figure is a list over runs; the
parent takes medians and ratios. The measurements live with their sections (bench/sections/).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import peak  # noqa: F401  (records this process's peak RSS at exit)
from .common import Skip
from .sections import buffers, conversion, e2e, llm, lowbit, memory, parallel, serve, serve_video_peer, video, vision

TASKS = {
    "convert_onepass": conversion.convert_onepass,
    "convert_bf16": conversion.convert_bf16,
    "llama_quantize": conversion.llama_quantize,
    "compare": conversion.compare,
    "vision": vision.measure,
    "llm": llm.measure,
    "e2e": e2e.measure,
    "video": video.measure,
    "serve": serve.measure,
    "serve_inproc": serve.in_process,
    "serve_video_peer": serve_video_peer.measure,
    "parallel": parallel.measure,
    "parallel_image": parallel.measure_image,
    "parallel_llama": parallel.measure_llama,
    "buffers": buffers.measure,
    "memory_profile": memory.profile,
} | lowbit.TASKS


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
