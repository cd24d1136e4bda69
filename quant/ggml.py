"""ctypes bindings to ggml's quantizers in the libggml-base shipped with llama-cpp-python.

We load the very file libllama links against (site-packages/llama_cpp/lib, or $LLAMA_CPP_LIB_PATH like
llama_cpp does), so when llama_cpp is imported too, dlopen hands back the same instance. Only plain C
functions with scalar/pointer arguments are bound; every call releases the GIL (ctypes.CDLL).
Plus what an eval callback needs to read a graph node: `struct ggml_tensor` and op names.
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
        raise RuntimeError(
            "llama-cpp-python is not installed: it provides the ggml quantizers (pip install llama-cpp-python)"
        )
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
    _sig(so.ggml_quantize_requires_imatrix, ctypes.c_bool, ty)
    _sig(so.ggml_validate_row_data, ctypes.c_bool, ty, ptr, sz)
    _sig(so.ggml_type_name, ctypes.c_char_p, ty)
    _sig(so.ggml_bf16_to_fp32_row, None, ptr, ptr, i64)
    _sig(so.ggml_fp16_to_fp32_row, None, ptr, ptr, i64)
    _sig(so.ggml_op_name, ctypes.c_char_p, ty)
    _sig(so.ggml_nbytes, sz, ptr)
    _sig(so.ggml_tensor_overhead, sz)
    _sig(so.ggml_backend_buffer_is_host, ctypes.c_bool, ptr)
    _sig(so.ggml_backend_tensor_get, None, ptr, ptr, sz, sz)
    return so


def _sig(fn, restype, *argtypes) -> None:
    fn.restype = restype
    fn.argtypes = list(argtypes)


def quantize_chunk(t: int, src: int, dst: int, nrows: int, n_per_row: int, imatrix: int | None) -> int:
    """ggml_quantize_chunk over `nrows` rows at raw addresses src (f32) -> dst; returns bytes written."""
    return lib().ggml_quantize_chunk(t, src, dst, 0, nrows, n_per_row, imatrix)


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


# --------------------------------------------------------------------------- graph nodes

MAX_DIMS, MAX_SRC, MAX_NAME, MAX_OP_PARAMS = 4, 10, 64, 64
_OBJECT_SIZE = 32  # struct ggml_object (ggml.c), which ggml_tensor_overhead() adds to the tensor


class Tensor(ctypes.Structure):
    """`struct ggml_tensor` as ggml.h of the pinned llama-cpp-python (0.3.36) declares it. Checked
    against ggml_tensor_overhead() before first use, so a changed layout fails loudly."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * MAX_DIMS),
        ("nb", ctypes.c_size_t * MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def tensor_at(addr: int) -> Tensor:
    """The ggml_tensor at `addr` (a graph node handed to an eval callback), read in place."""
    _check_layout()
    return Tensor.from_address(addr)


@lru_cache(maxsize=1)
def _check_layout() -> None:
    want = lib().ggml_tensor_overhead() - _OBJECT_SIZE
    if ctypes.sizeof(Tensor) != want:
        raise RuntimeError(
            f"libggml-base's struct ggml_tensor is {want} bytes, these bindings expect "
            f"{ctypes.sizeof(Tensor)}: llama-cpp-python version mismatch"
        )


@lru_cache(maxsize=None)
def op_name(op: int) -> str:
    """Name of an `enum ggml_op` value read from a live tensor ("MUL_MAT"); compared by name because
    the enum's numbering moves between ggml versions."""
    return lib().ggml_op_name(op).decode()


def nbytes(t: int) -> int:
    return lib().ggml_nbytes(t)


def buffer_is_host(buffer: int | None) -> bool:
    return bool(buffer) and lib().ggml_backend_buffer_is_host(buffer)


def tensor_get(t: int, dst: int, nbytes_: int) -> None:
    """Copy a tensor's bytes from its backend (e.g. GPU) memory to host memory at `dst`."""
    lib().ggml_backend_tensor_get(t, dst, 0, nbytes_)
