"""ggml's own answer to "would the CPU_REPACK buffer type take this weight?", asked through its C API.

Mirrors how llama.cpp picks a weight's buffer type: `weight_buft_supported()`, called by
`select_weight_buft()` for each candidate type, in ggml-org/llama.cpp@0c1e57098
src/llama-model-loader.cpp (the commit llama-cpp-python 0.3.36 vendors, per its CHANGELOG). For each
weight it builds, in a no-alloc ggml context, the op that will use the weight (`MUL_MAT` against an F32
activation of shape [ne0, 512, ne2, ne3]; `GET_ROWS` with 512 I32 ids; `MUL` by an F32 tensor of the
weight's shape), puts a zero-size dummy buffer of the candidate type in the weight's `buffer` field
(`ggml_backend_buft_alloc_buffer(buft, 0)`) and asks `ggml_backend_dev_supports_op(cpu_dev, op)`. For
CPU_REPACK that lands in `ggml_backend_cpu_device_supports_op` (ggml/src/ggml-cpu/ggml-cpu.cpp), which
hands the question to the repack `extra_buffer_type::supports_op` and so to
`ggml_repack_get_optimal_repack_type` (ggml/src/ggml-cpu/repack.cpp). Only CPU_REPACK is asked about:
the product never uses the AMX type. The op a tensor meets comes from `LLM_TENSOR_INFOS`
(src/llama-arch.cpp); only the tensor kinds of the Qwen3 language model are listed here, and an unknown
kind raises, so a new kind gets looked up there rather than guessed. `struct ggml_tensor`
(ggml/include/ggml.h) is minicpmv.quant.ggml's declaration, whose size is checked before use.

Nothing is computed: supports_op only reads the op's shapes, types and buffer types, so no AMX (or any
other) kernel runs, on any machine.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Iterable
from functools import lru_cache

import gguf

from minicpmv.quant import ggml as qg

QT = gguf.GGMLQuantizationType
N_TOKENS = 512  # the batch llama.cpp's probe ops are built for
GGML_DEVICE_CPU = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU

# LLM_TENSOR_INFOS (src/llama-arch.cpp): the op each tensor kind of a Qwen3 model is used with.
_OPS = {
    "token_embd": "GET_ROWS",
    "output": "MUL_MAT",
    "output_norm": "MUL",
    **{k: "MUL_MAT" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
    **{k: "MUL" for k in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm")},
}


class _InitParams(ctypes.Structure):
    # struct ggml_init_params (ggml/include/ggml.h), passed to ggml_init by value
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def weight_op(name: str) -> str:
    """The ggml op llama.cpp checks a weight with ("MUL_MAT", "GET_ROWS", "MUL")."""
    m = re.fullmatch(r"(?:blk\.\d+\.)?(.+)\.weight", name)
    if not m or m.group(1) not in _OPS:
        raise KeyError(f"{name}: tensor kind not in this oracle's copy of LLM_TENSOR_INFOS (src/llama-arch.cpp)")
    return _OPS[m.group(1)]


@lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, int]:
    """(libggml-base with the probe's signatures, the CPU device). Own CDLL objects for the very files
    llama_cpp loaded (dlopen returns the same instance), so these argtypes touch nobody else's."""
    base_path = qg.lib()._name  # libggml-base.{so,dylib} or ggml-base.dll
    base = ctypes.CDLL(base_path)
    core = ctypes.CDLL(base_path.replace("ggml-base", "ggml"))  # the backend registry lives in libggml
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn, res, args in [
        (base.ggml_init, p, [_InitParams]),
        (base.ggml_free, None, [p]),
        (base.ggml_tensor_overhead, ctypes.c_size_t, []),
        (base.ggml_new_tensor, p, [p, i, i, ctypes.POINTER(i64)]),
        (base.ggml_new_tensor_1d, p, [p, i, i64]),
        (base.ggml_new_tensor_4d, p, [p, i, i64, i64, i64, i64]),
        (base.ggml_mul_mat, p, [p, p, p]),
        (base.ggml_get_rows, p, [p, p, p]),
        (base.ggml_mul, p, [p, p, p]),
        (base.ggml_backend_buft_alloc_buffer, p, [p, ctypes.c_size_t]),
        (base.ggml_backend_buffer_free, None, [p]),
        (base.ggml_backend_dev_supports_op, ctypes.c_bool, [p, p]),
        (core.ggml_backend_dev_by_type, p, [i]),
    ]:
        fn.restype, fn.argtypes = res, args
    dev = core.ggml_backend_dev_by_type(GGML_DEVICE_CPU)
    if not dev:
        raise RuntimeError("this llama.cpp has no CPU device")
    return base, dev


def _op_builders(base: ctypes.CDLL) -> dict[str, Callable[[int, int, list[int]], int]]:
    """op name -> (ctx, weight, ne) -> the op tensor, shaped like weight_buft_supported's."""
    f32, i32 = int(QT.F32), int(QT.I32)
    return {
        "MUL_MAT": lambda ctx, w, ne: base.ggml_mul_mat(
            ctx, w, base.ggml_new_tensor_4d(ctx, f32, ne[0], N_TOKENS, ne[2], ne[3])
        ),
        "GET_ROWS": lambda ctx, w, ne: base.ggml_get_rows(ctx, w, base.ggml_new_tensor_1d(ctx, i32, N_TOKENS)),
        "MUL": lambda ctx, w, ne: base.ggml_mul(ctx, base.ggml_new_tensor_4d(ctx, f32, *ne), w),
    }


def buft_supports(buft: int, name: str, ggml_type: int, shape: tuple[int, ...]) -> bool:
    """ggml's answer for one weight (ggml shape ne, type) in buffer type `buft` on the CPU device."""
    base, dev = _libs()
    ne4 = list(shape) + [1] * (4 - len(shape))
    ctx = base.ggml_init(_InitParams(base.ggml_tensor_overhead() * 8, None, True))
    if not ctx:
        raise RuntimeError("ggml_init failed")
    try:
        w = base.ggml_new_tensor(ctx, ggml_type, len(shape), (ctypes.c_int64 * len(shape))(*shape))
        op = _op_builders(base)[weight_op(name)](ctx, w, ne4)
        wt = qg.tensor_at(w)  # struct ggml_tensor, layout checked against ggml_tensor_overhead()
        assert not wt.buffer, name
        wt.buffer = base.ggml_backend_buft_alloc_buffer(buft, 0)  # the zero-size dummy buffer
        try:
            return bool(base.ggml_backend_dev_supports_op(dev, op))
        finally:
            base.ggml_backend_buffer_free(wt.buffer)
            wt.buffer = None
    finally:
        base.ggml_free(ctx)


def repack_tensors_by_ggml(tensors: Iterable[tuple[str, tuple[int, ...], int]]) -> list[str]:
    """Names of the (name, ggml shape ne, type) tensors that this library's CPU_REPACK would take, in order:
    the same question and answer shape as runtime/weight_buffers.py's repack_tensors()."""
    from minicpmv.runtime.weight_buffers import REPACK_BUFT, extra_buffer_types

    buft = extra_buffer_types().get(REPACK_BUFT)
    if not buft:
        raise RuntimeError(f"this llama.cpp has no {REPACK_BUFT} buffer type")
    return [name for name, shape, ggml_type in tensors if buft_supports(buft, name, int(ggml_type), tuple(shape))]


def repack_tensors_by_ggml_in(gguf_path: str | os.PathLike) -> list[str]:
    """repack_tensors_by_ggml() of every tensor of a GGUF file (read with gguf-py, not our reader)."""
    reader = gguf.GGUFReader(gguf_path)
    return repack_tensors_by_ggml((t.name, tuple(int(n) for n in t.shape), int(t.tensor_type)) for t in reader.tensors)
