"""llama-quantize's imatrix reader, as an oracle: common_imatrix_load (common/imatrix-loader.cpp of
the pinned llama.cpp) re-enacted step by step on ggml's own GGUF parser (gguf_init_from_file in
libggml-base), so a file is judged by the C code that parses it in llama-quantize, not by gguf-py.

Returns what llama-quantize's load_imatrix hands to llama_model_quantize: per weight the sums
divided by the (rounded) count of each matrix, 1 where the count is 0, plus datasets and chunks.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minicpmv.quant import ggml

GGUF_TYPE_UINT32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 4, 8, 9
GGML_TYPE_F32 = 0


class _Params(ctypes.Structure):  # struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@dataclass
class Loaded:
    weights: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    counts: dict[str, list[int]]


def _lib():
    g = ggml.lib()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, res, args in (
        ("gguf_init_from_file", p, [ctypes.c_char_p, _Params]),
        ("gguf_free", None, [p]),
        ("gguf_find_key", i64, [p, ctypes.c_char_p]),
        ("gguf_get_kv_type", ctypes.c_int, [p, i64]),
        ("gguf_get_arr_type", ctypes.c_int, [p, i64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [p, i64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [p, i64, ctypes.c_size_t]),
        ("gguf_get_val_u32", ctypes.c_uint32, [p, i64]),
        ("ggml_get_first_tensor", p, [p]),
        ("ggml_get_next_tensor", p, [p, p]),
        ("ggml_free", None, [p]),
    ):
        fn = getattr(g, name)
        fn.restype, fn.argtypes = res, args
    return g


def load_like_llama_quantize(path: Path) -> Loaded:
    g = _lib()
    ctx = ctypes.c_void_p()
    gg = g.gguf_init_from_file(str(path).encode(), _Params(False, ctypes.pointer(ctx)))
    assert gg, f"{path}: ggml's GGUF parser rejects the file"
    try:
        keys = {
            k: g.gguf_find_key(gg, k.encode())
            for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        }
        # load_imatrix: "missing imatrix metadata" unless all three keys exist
        assert all(v != -1 for v in keys.values()), f"{path}: missing imatrix metadata {keys}"
        kd = keys["imatrix.datasets"]
        assert g.gguf_get_kv_type(gg, kd) == GGUF_TYPE_ARRAY and g.gguf_get_arr_type(gg, kd) == GGUF_TYPE_STRING
        datasets = [g.gguf_get_arr_str(gg, kd, i).decode() for i in range(g.gguf_get_arr_n(gg, kd))]
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):  # gguf_get_val_u32 aborts on another type
            assert g.gguf_get_kv_type(gg, keys[k]) == GGUF_TYPE_UINT32, k
        chunk_count = g.gguf_get_val_u32(gg, keys["imatrix.chunk_count"])
        chunk_size = g.gguf_get_val_u32(gg, keys["imatrix.chunk_size"])

        pairs: dict[str, list] = {}
        t = g.ggml_get_first_tensor(ctx)
        n_tensors = 0
        while t:
            n_tensors += 1
            tt = ggml.tensor_at(t)
            name = tt.name.decode()
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = tt
            t = g.ggml_get_next_tensor(ctx, t)
        assert n_tensors >= 1, f"{path}: no data"
        weights, counts = {}, {}
        for name, (s, c) in pairs.items():
            assert s is not None and c is not None, f"mismatched sums and counts for {name}"
            assert s.type == GGML_TYPE_F32 and c.type == GGML_TYPE_F32, f"{name} must be F32"
            nval = int(np.prod([s.ne[i] for i in range(4)]))
            ncounts = int(np.prod([c.ne[i] for i in range(4)]))
            sums = np.ctypeslib.as_array(ctypes.cast(s.data, ctypes.POINTER(ctypes.c_float)), (nval,)).copy()
            cnt = [
                int(round(v))
                for v in np.ctypeslib.as_array(ctypes.cast(c.data, ctypes.POINTER(ctypes.c_float)), (ncounts,))
            ]
            ne0 = nval // ncounts
            e = np.empty(nval, np.float32)
            for j, cj in enumerate(cnt):  # quantize.cpp load_imatrix: sums / count, 1 for count 0
                e[j * ne0 : (j + 1) * ne0] = sums[j * ne0 : (j + 1) * ne0] / np.float32(cj) if cj > 0 else 1
            weights[name], counts[name] = e, cnt
        return Loaded(weights, datasets, chunk_count, chunk_size, counts)
    finally:
        g.gguf_free(gg)
        g.ggml_free(ctx)
