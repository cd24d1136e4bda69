"""What this machine's CPU is and how many threads to use: one place for the runtime, quant/ and bench/.

Read once per process from /proc/cpuinfo (Linux) or sysctl (macOS). Flags are the kernel's names
(`avx2`, `avx512_bf16`, `amx_tile`, ...); on macOS and other systems without such a list the set is
empty and callers decide from `machine` instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The flags a bug report and the benchmarks show (the full list is a few hundred words long).
REPORTED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC 9B14", "Apple M2", ...
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    system: str  # platform.system(): Linux, Darwin, Windows
    flags: frozenset[str]
    physical_cores: int
    logical_cpus: int  # usable by this process (affinity), not the machine's total

    @property
    def flags_digest(self) -> str:
        """A short fingerprint of the whole flag set (tells apart CPUs that share a name)."""
        return hashlib.sha1(" ".join(sorted(self.flags)).encode()).hexdigest()[:12]

    @property
    def reported_flags(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str], int]:
    """(model name, flags, distinct physical cores) from the text of /proc/cpuinfo. Virtual machines
    often show a bare "AMD EPYC": the x86 family/model numbers are added, as they name the generation."""
    model, flags, cores, phys = "", frozenset(), set(), "0"
    fam = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key in ("cpu family", "model") and key not in fam:
            fam[key] = val
        if key in ("model name", "Model", "cpu model") and not model:
            model = val
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(val.split())
        elif key == "physical id":
            phys = val
        elif key == "core id":
            cores.add((phys, val))
    if model and len(fam) == 2:
        model += f" (family {fam['cpu family']}, model {fam['model']})"
    return model, flags, len(cores)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    usable = _usable_cpus()
    model, flags, cores = "", frozenset(), 0
    if platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string") or ""
        cores = int(_sysctl("hw.perflevel0.physicalcpu") or _sysctl("hw.physicalcpu") or 0)
    else:
        try:
            model, flags, cores = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError:
            pass
    return CpuInfo(
        model=model or platform.processor() or "unknown CPU",
        machine=platform.machine(),
        system=platform.system(),
        flags=flags,
        physical_cores=max(1, min(cores or usable, usable)),
        logical_cpus=usable,
    )


def default_threads() -> int:
    """Threads for llama.cpp, torch and the quantizer: one per physical core this process may use
    (a second hyper-thread on a core shares its vector units and slows matrix kernels down)."""
    return cpu_info().physical_cores
