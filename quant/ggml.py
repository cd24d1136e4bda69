"""ctypes bindings to ggml's quantizers in the libggml-base shipped with llama-cpp-python.

We load the very file libllama links against (site-packages/llama_cpp/lib, or $LLAMA_CPP_LIB_PATH like
llama_cpp does), so when llama_cpp is imported too, dlopen hands back the same instance. Only plain C
functions with scalar/pointer arguments are bound; every call releases the GIL (ctypes.CDLL).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

_LIB_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")


def lib_dir() -> Path:
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed: it provides the ggml quantizers (pip install llama-cpp-python)")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    d = lib_dir()
    for name in _LIB_NAMES:
        if (d / name).exists():
            break
    else:
        raise RuntimeError(f"{d}: no libggml-base shared library found (llama-cpp-python install is incomplete)")
    so = ctypes.CDLL(str(d / name))
    i64, sz, ptr, ty = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
    _sig(so.ggml_quantize_chunk, sz, ty, ptr, ptr, i64, i64, i64, ptr)
    _sig(so.ggml_type_size, sz, ty)
    _sig(so.ggml_is_quantized, ctypes.c_bool, ty)
    _sig(so.ggml_quantize_requires_imatrix, ctypes.c_bool, ty)
    _sig(so.ggml_validate_row_data, ctypes.c_bool, ty, ptr, sz)
    _sig(so.ggml_type_name, ctypes.c_char_p, ty)
    _sig(so.ggml_quantize_init, None, ty)
    _sig(so.ggml_bf16_to_fp32_row, None, ptr, ptr, i64)
    _sig(so.ggml_fp16_to_fp32_row, None, ptr, ptr, i64)
    return so


def _sig(fn, restype, *argtypes) -> None:
    fn.restype = restype
    fn.argtypes = list(argtypes)


def quantize_chunk(t: int, src: int, dst: int, nrows: int, n_per_row: int, imatrix: int | None) -> int:
    """ggml_quantize_chunk over `nrows` rows at raw addresses src (f32) -> dst; returns bytes written."""
    return lib().ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, imatrix)


def is_quantized(t: int) -> bool:
    return lib().ggml_is_quantized(t)


def requires_imatrix(t: int) -> bool:
    return lib().ggml_quantize_requires_imatrix(t)


def validate_row_data(t: int, data: int, nbytes: int) -> bool:
    return lib().ggml_validate_row_data(t, data, nbytes)


def type_name(t: int) -> str:
    return lib().ggml_type_name(t).decode()


def to_f32_row(src_type: str, src: int, dst: int, n: int) -> None:
    """n BF16 or F16 values at src -> float32 at dst (what llama-quantize does to a 16-bit input)."""
    fn = lib().ggml_bf16_to_fp32_row if src_type == "BF16" else lib().ggml_fp16_to_fp32_row
    fn(src, dst, n)


def quantize_init(t: int) -> None:
    lib().ggml_quantize_init(t)
