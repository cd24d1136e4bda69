"""One module per section of BENCHMARKS.md: `run(session)` (in the driver's process: asks the worker
for measurements, turns them into table rows and notes) and the measurement itself (in a fresh
`python -m bench.worker` process)."""

from . import conversion, e2e, llm, lowbit, sizes, video, vision

SECTIONS = {"conversion": conversion, "vision": vision, "llm": llm, "e2e": e2e, "video": video, "sizes": sizes,
            "lowbit": lowbit}
