"""Shared plumbing: cache paths, disk check, machine info, and one-subprocess-per-measurement.

Every measured step runs in a fresh `python -m bench.worker` process so that its peak RSS is its
own: the child writes its VmHWM at exit (bench/peak.py), because the ru_maxrss that `os.wait4`
returns starts at the parent's resident set at fork; ru_maxrss is the fallback where there is no
/proc (macOS).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import peak


def now() -> str:
    """UTC time stamp, as BENCHMARKS.md and bench/results.json show them."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


REPO = Path(__file__).resolve().parent.parent
GB = 1e9


class BenchError(RuntimeError):
    """A measured step failed; the message is one line (plus the worker's log tail)."""


class Skip(Exception):
    """A section cannot run (a dependency is missing); the message is the reason."""


def cache_root() -> Path:
    env = os.environ.get("MINICPMV_BENCH_CACHE")
    return Path(env) if env else REPO / ".cache" / "bench"


def free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def dir_bytes(path: Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def evict_page_cache(path: Path) -> None:
    """Drop a file's (or folder's) clean pages from the page cache, so a timed read starts cold
    (posix_fadvise needs no privileges, unlike /proc/sys/vm/drop_caches)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    from minicpmv.cpu import cpu_info
    from minicpmv.runtime.weight_buffers import plan_for_this_machine

    cpu = cpu_info()
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu.model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cpu.logical_cpus,
        "physical_cores": cpu.physical_cores,
        "cpu_features": sorted(cpu.reported_flags),
    }
    plan = plan_for_this_machine()
    info["weight_buffers"] = f"{plan.mode}: {plan.reason}"
    try:
        mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()}
        info["memory_gb"] = round(mem["MemTotal"] * 1024 / GB, 1)
    except (OSError, KeyError, ValueError):
        info["memory_gb"] = None
    versions = {}
    from importlib import metadata

    for dist in ("torch", "numpy", "llama-cpp-python", "gguf", "av"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    return info


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- subprocess measurement


@dataclass
class Measured:
    result: dict  # what the worker returned
    wall_s: float  # wall time of the whole subprocess (incl. interpreter start)
    peak_rss_gb: float  # the subprocess's own peak resident set (VmHWM, bench/peak.py)


def run_cmd(cmd: list[str], *, log: Path, timeout: float | None = None) -> tuple[int, float, float]:
    """Run a command (output appended to `log`); return (exit code, wall seconds, peak RSS in GB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as lf:
        lf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        lf.flush()
        fd, name = tempfile.mkstemp(prefix="peak-", suffix=".txt")
        os.close(fd)
        peak_file = Path(name)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=lf, stderr=subprocess.STDOUT, env={**os.environ, peak.ENV: str(peak_file)}
        )
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
    rc = -9999 if timed_out else proc.returncode
    try:
        own = int(peak_file.read_text() or 0)
    except (OSError, ValueError):
        own = 0
    peak_file.unlink(missing_ok=True)
    # ru_maxrss (KiB on Linux, bytes on macOS) only where the child could not say (bench/peak.py)
    return rc, wall, (own or ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)) / GB


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM (a server's graceful shutdown), SIGKILL if it is still there after `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(log: Path, n: int = 15) -> str:
    try:
        return "".join(Path(log).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


def run_worker(task: str, args: dict, *, log: Path, timeout: float | None = None) -> Measured:
    """Run `python -m bench.worker task` in a fresh process; return its JSON result and peak RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
        out = Path(tf.name)
    try:
        rc, wall, rss = run_cmd(
            [sys.executable, "-m", "bench.worker", task, json.dumps(args), str(out)], log=log, timeout=timeout
        )
        if rc != 0:
            why = "timed out" if rc == -9999 else f"exit code {rc}"
            raise BenchError(f"{task} failed ({why}); log {log}:\n{log_tail(log)}")
        result = json.loads(out.read_text() or "{}")
        # kept beside the log: a section that fails after its workers can be rendered again from these
        shutil.copyfile(out, log.with_name(f"{log.stem}-{task}-{time.strftime('%H%M%S')}.json"))
    finally:
        out.unlink(missing_ok=True)
    if "skip" in result:
        raise Skip(result["skip"])
    return Measured(result, wall, rss)
