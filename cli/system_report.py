"""What a bug report needs: versions, the CPU, llama.cpp's build, and the choices the runtime makes
on this machine (weight buffers, how the model file is loaded, vision precision, threads, GPU).
`minicpm-run --version` prints it."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from minicpmv.cpu import cpu_info, default_threads

PACKAGES = ("minicpmv", "llama-cpp-python", "torch", "gguf", "numpy", "pillow", "av", "huggingface-hub")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _memory_gb() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return f"{kb * 1024 / 1e9:.1f} GB"
    except (OSError, StopIteration, ValueError):
        return "unknown"


def system_report() -> list[tuple[str, str]]:
    """(label, value) rows; values are one line each."""
    import llama_cpp as ll
    import torch

    from minicpmv.runtime.llama_backend import backend_init
    from minicpmv.runtime.llama_load import default_gpu_layers, load_mode
    from minicpmv.runtime.vision_dtype import choose_vision_dtype
    from minicpmv.runtime.weight_buffers import plan_for_this_machine, system_features

    backend_init()
    cpu = cpu_info()
    features = system_features()
    gpu_layers = default_gpu_layers()
    plan = plan_for_this_machine(gpu_layers=gpu_layers)
    vision = choose_vision_dtype("auto")
    mps = getattr(torch.backends, "mps", None)
    rows = [(d, _version(d)) for d in PACKAGES]
    rows += [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        (
            "cpu",
            f"{cpu.model} ({cpu.machine}), {cpu.physical_cores} physical cores, {cpu.logical_cpus} usable logical CPUs",
        ),
        ("cpu flags", " ".join(cpu.reported_flags) or "(none reported)"),
        ("memory", _memory_gb()),
        ("llama.cpp build", " ".join(f"{k}={v}" for k, v in features.items() if v != "0") or "(no features)"),
        ("llama.cpp GPU offload", "yes" if ll.llama_supports_gpu_offload() else "no (CPU only)"),
        ("weight buffers", f"{plan.mode}: {plan.reason}"),
        ("model load", load_mode(gpu_layers, False, None)),
        ("vision dtype auto", vision.describe()),
        ("threads", f"{default_threads()} (llama.cpp and torch), torch reports {torch.get_num_threads()}"),
        ("gpu layers default", "all (Metal)" if gpu_layers else "none (CPU)"),
        ("torch MPS", "available" if mps is not None and mps.is_available() else "not available"),
    ]
    return rows


def format_report(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
