"""Importing this records the process's own peak resident set (VmHWM) at exit into the file named
by $MINICPMV_BENCH_PEAK_FILE, for bench.common.run_cmd.

Why not just ru_maxrss from os.wait4: on Linux a child's ru_maxrss starts at its parent's resident
set at fork (exec keeps the larger of it and the new process's own peak), so a parent that once
mapped a 5 GB file would make every later measurement at least that large. VmHWM belongs to the
address space that exec creates, so it counts only what the measured program itself touched.
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

ENV = "MINICPMV_BENCH_PEAK_FILE"


def _write() -> None:
    try:
        status = Path("/proc/self/status").read_text()
        kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
        Path(os.environ[ENV]).write_text(str(kib * 1024))
    except (OSError, AttributeError, KeyError, ValueError):
        pass  # no /proc (macOS): run_cmd falls back to ru_maxrss


if os.environ.get(ENV):
    atexit.register(_write)
