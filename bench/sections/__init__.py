"""One module per section of BENCHMARKS.md: `run(session)` (in the driver's process: asks the worker
for measurements, turns them into table rows and notes) and the measurement itself (in a fresh
`python -m bench.worker` process)."""

from . import buffers, conversion, e2e, llm, lowbit, memory, parallel, serve, sizes, video, vision

SECTIONS = {
    "conversion": conversion,
    "vision": vision,
    "llm": llm,
    "buffers": buffers,
    "e2e": e2e,
    "video": video,
    "serve": serve,
    "parallel": parallel,
    "sizes": sizes,
    "memory": memory,
    "lowbit": lowbit,
}
# lowbit quantizes the 8B model eleven times (hours on 2 cores; resumable): run it with --only lowbit
DEFAULT = [k for k in SECTIONS if k != "lowbit"]
