"""Where llama.cpp keeps the language model's weights on the CPU: chosen here, for every load.

llama.cpp's CPU backend has "extra" weight buffer types besides plain memory:
- CPU_REPACK: rows of Q4_0/Q4_K/IQ4_NL/... interleaved for its AVX2/AVX-512/NEON GEMM kernels. It is
  what makes a Q4_K_M prefill fast, so we keep it.
- AMX: Intel tile kernels, present when llama.cpp was compiled for a CPU with AMX (GGML_NATIVE on a
  Sapphire Rapids Xeon, or a prebuilt wheel built with AMX_INT8). With `use_extra_bufts` llama.cpp
  hands every weight it can to the first extra type that takes it, AMX first. In the llama.cpp of
  llama-cpp-python 0.3.36 that path dies with SIGILL (`tilezero` on a compute thread that never
  got the tile permission: ggml-org/llama.cpp PR #26954, issue #28756) on the first batched decode of
  a quantized model.

So where the loaded library has AMX compiled in, llama.cpp's own choice is switched off and the tensors
that CPU_REPACK would take are given to it by name (`tensor_buft_overrides`); everything else stays
in plain CPU memory. Which tensors CPU_REPACK takes mirrors `ggml_repack_get_optimal_repack_type`
(ggml-org/llama.cpp@0c1e57098 ggml/src/ggml-cpu/repack.cpp, x86 branch; AMX only exists on x86).
Tests check the mirror against ggml's own answer (the CPU device's supports_op, asked through the C
API as llama.cpp's loader asks it, so on AMX machines too), against the tensors llama.cpp logs as
repacked, and against llama.cpp's own choice where the library has no AMX (docs/llamacpp.md §7).
The vision projector (mtmd's clip) and the quantizer never use extra buffer types.

`MINICPMV_WEIGHT_BUFFERS=llama|repack|none` forces a choice (benchmarks, bug reports).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import gguf

from minicpmv.cpu import cpu_info
from minicpmv.schema import TOKEN_EMBD

ENV = "MINICPMV_WEIGHT_BUFFERS"
MODES = ("llama", "repack", "none")
REPACK_BUFT = "CPU_REPACK"

QT = gguf.GGMLQuantizationType
# ggml_repack_get_optimal_repack_type, x86: weight type -> the compiled CPU feature its kernel needs.
# Rows (ggml ne[1]) must also be a multiple of 8 (the 8x8 interleave).
_X86_REPACK: dict[QT, str] = {QT.Q4_0: "AVX2", QT.Q4_K: "AVX2", QT.IQ4_NL: "AVX2", QT.MXFP4: "AVX2", QT.Q2_K: "AVX512"}
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# Language-model tensors that llama.cpp feeds to get_rows rather than mul_mat (never repacked).
_NOT_MATMUL = (TOKEN_EMBD,)


@dataclass(frozen=True)
class BufferPlan:
    mode: str  # "llama": llama.cpp's own choice; "repack": CPU_REPACK by name; "none"
    reason: str  # one line for --verbose and the system report

    @property
    def use_extra_bufts(self) -> bool:
        return self.mode == "llama"


def library_features(system_info: str) -> dict[str, str]:
    """`llama_print_system_info()` ("CPU : AVX2 = 1 | AMX_INT8 = 1 | ...") as {feature: value}."""
    out = {}
    for part in system_info.replace("\n", "|").split("|"):
        name, sep, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if sep and name:
            out[name] = value.strip()
    return out


def choose(
    features: Mapping[str, str], machine: str, cpu_flags: Iterable[str], *, gpu: bool = False, forced: str | None = None
) -> BufferPlan:
    """The weight buffers for one load, from the library's compiled features and the CPU.

    `features`: `library_features(llama_print_system_info())`; `cpu_flags`: the kernel's CPU flags.
    """
    if forced:
        if forced not in MODES:
            raise ValueError(f"{ENV}={forced!r} is not one of {', '.join(MODES)}")
        return BufferPlan(forced, f"forced by {ENV}={forced}")
    lib_amx = features.get("AMX_INT8") == "1"
    cpu_amx = bool(set(cpu_flags) & {"amx_tile", "amx_int8"})
    if gpu:
        return BufferPlan("llama", "layers offloaded to a GPU: llama.cpp places the weights")
    if not lib_amx:
        return BufferPlan(
            "llama",
            "llama.cpp built without AMX: its own choice "
            f"({'CPU_REPACK' if features.get('REPACK') == '1' else 'plain CPU memory'})",
        )
    cpu = "this CPU has AMX" if cpu_amx else "this CPU has no AMX"
    if machine.lower() not in _X86 or features.get("REPACK") != "1":
        return BufferPlan(
            "none",
            f"llama.cpp built with AMX_INT8 ({cpu}): extra buffer types off (AMX crashes; no CPU_REPACK in this build)",
        )
    return BufferPlan(
        "repack",
        f"llama.cpp built with AMX_INT8 ({cpu}): AMX weight buffers crash "
        "(llama.cpp PR #26954), so CPU_REPACK only, by tensor name",
    )


def repack_tensors(tensors: Iterable[tuple[str, tuple[int, ...], QT]], features: Mapping[str, str]) -> list[str]:
    """Names of the language-model tensors CPU_REPACK takes on x86 with these compiled features.

    `tensors`: (name, ggml shape ne, type). Only 2-D mul_mat weights qualify.
    """
    out = []
    for name, shape, qtype in tensors:
        need = _X86_REPACK.get(qtype)
        if (
            need
            and features.get(need) == "1"
            and len(shape) == 2
            and shape[1] % 8 == 0
            and name.endswith(".weight")
            and name not in _NOT_MATMUL
        ):
            out.append(name)
    return out


def repack_tensors_in(gguf_path: str | os.PathLike) -> list[str]:
    """repack_tensors() of every tensor of a GGUF file, with this library's compiled features."""
    from minicpmv.gguf_info import read_gguf_info

    info = read_gguf_info(gguf_path)
    return repack_tensors(((t.name, t.shape, t.ggml_type) for t in info.tensors.values()), system_features())


def override_patterns(names: Iterable[str]) -> list[str]:
    """A few anchored regexes matching exactly `names`: one per tensor kind, the block numbers as
    an alternation (llama.cpp compiles every pattern once per tensor, so a pattern per name would
    cost a few hundred thousand regex compilations on the 8B model)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", n)
        if m:
            groups[m.group(2)].append(m.group(1))
        else:
            groups[n] = []
    pats = []
    for kind, blocks in sorted(groups.items()):
        if blocks:
            alt = "|".join(sorted(set(blocks), key=int))
            pats.append(rf"^blk\.({alt})\.{re.escape(kind)}$")
        else:
            pats.append(rf"^{re.escape(kind)}$")
    return pats


# --------------------------------------------------------------------------- llama.cpp side


class _Override(ctypes.Structure):
    # struct llama_model_tensor_buft_override (llama.h): llama-cpp-python declares the field only as
    # a void pointer.
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def extra_buffer_types() -> dict[str, int]:
    """The CPU device's extra buffer types in this library, {name: ggml_backend_buffer_type_t}."""
    from llama_cpp._ggml import libggml as g

    g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.ggml_backend_buft_name.restype = ctypes.c_char_p
    g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    dev = g.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return {}
    fn = g.ggml_backend_reg_get_proc_address(g.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return {}
    arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    out, i = {}, 0
    while arr and arr[i]:
        out[g.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
        i += 1
    return out


def system_features() -> dict[str, str]:
    import llama_cpp as ll

    return library_features(ll.llama_print_system_info().decode("utf-8", "replace"))


def plan_for_this_machine(*, gpu_layers: int = 0) -> BufferPlan:
    import llama_cpp as ll

    info = cpu_info()
    gpu = gpu_layers != 0 and bool(ll.llama_supports_gpu_offload())
    return choose(system_features(), info.machine, info.flags, gpu=gpu, forced=os.environ.get(ENV) or None)


@dataclass
class WeightBuffers:
    """Applies a plan to a `llama_model_params` and keeps the override table alive for the load."""

    plan: BufferPlan
    repacked: list[str] = field(default_factory=list)
    _keep: list = field(default_factory=list, repr=False)

    def apply(self, mp, gguf_path: str | os.PathLike) -> None:
        mp.use_extra_bufts = self.plan.use_extra_bufts
        if self.plan.mode != "repack":
            return
        buft = extra_buffer_types().get(REPACK_BUFT)
        if not buft:
            return
        self.repacked = repack_tensors_in(gguf_path)
        pats = [p.encode() for p in override_patterns(self.repacked)]
        table = (_Override * (len(pats) + 1))(*[_Override(p, buft) for p in pats], _Override(None, None))
        self._keep = [pats, table]
        mp.tensor_buft_overrides = ctypes.cast(table, ctypes.c_void_p)


def weight_buffers(mp, gguf_path: str | os.PathLike, *, plan: BufferPlan | None = None) -> WeightBuffers:
    """Set `mp` (llama_model_params) up for loading `gguf_path`; hold the result until the load returns."""
    if mp.vocab_only:
        return WeightBuffers(BufferPlan("llama", "vocabulary only: no weights loaded"))
    wb = WeightBuffers(plan or plan_for_this_machine(gpu_layers=mp.n_gpu_layers))
    wb.apply(mp, gguf_path)
    return wb
