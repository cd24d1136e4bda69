"""llama.cpp's own per-tensor type choice for a tensor list, without a model file or any quantizing.

libllama exports a staging API for this (src/llama-ext.h at the pinned commit: a mock model from a
few hyperparameters, then `llama_quant_compute_types`, the very code llama-quantize runs). It is C++
without `extern "C"`, so the symbols are looked up by their Itanium-mangled names (Linux/macOS
toolchains); the arguments are plain pointers and enums, so ctypes calls them as C functions.
llama_quant_compute_types always works as if no importance matrix were given.
"""

from __future__ import annotations

import ctypes

import llama_cpp as L
import llama_cpp.llama_cpp as LL

from minicpmv.quant import ggml

_SYMS = {
    "model_from_metadata": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
    "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
    "free": "_Z16llama_quant_freeP19quantize_state_impl",
    "compute_types": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
}


class ModelDesc(ctypes.Structure):  # struct llama_quant_model_desc
    _fields_ = [
        ("architecture", ctypes.c_char_p),
        ("n_embd", ctypes.c_uint32),
        ("n_ff", ctypes.c_uint32),
        ("n_layer", ctypes.c_uint32),
        ("n_head", ctypes.c_uint32),
        ("n_head_kv", ctypes.c_uint32),
        ("n_expert", ctypes.c_uint32),
        ("n_embd_head_k", ctypes.c_uint32),
        ("n_embd_head_v", ctypes.c_uint32),
    ]


class _InitParams(ctypes.Structure):  # struct ggml_init_params (by value)
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _fn(name: str, restype, *argtypes):
    f = getattr(LL._lib, _SYMS[name])
    f.restype, f.argtypes = restype, list(argtypes)
    return f


def llama_types(
    tensors: list[tuple[str, tuple[int, ...]]],
    ftype: int,
    *,
    n_embd: int,
    n_ff: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    input_type: int,
) -> list[int]:
    """GGML type ids llama-quantize picks for (gguf name, numpy shape) tensors of type `input_type`
    (pass them in llama-quantize's order: the counters advance along the list)."""
    p = ctypes.c_void_p
    from_meta = _fn("model_from_metadata", p, ctypes.POINTER(ModelDesc))
    init = _fn("init", p, p, ctypes.POINTER(L.llama_model_quantize_params))
    free = _fn("free", None, p)
    compute = _fn(
        "compute_types", None, p, ctypes.c_int, ctypes.POINTER(p), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t
    )
    g = ggml.lib()
    g.ggml_init.restype, g.ggml_init.argtypes = p, [_InitParams]
    g.ggml_new_tensor.restype, g.ggml_new_tensor.argtypes = (
        p,
        [p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)],
    )
    g.ggml_set_name.restype, g.ggml_set_name.argtypes = p, [p, ctypes.c_char_p]
    g.ggml_free.restype, g.ggml_free.argtypes = None, [p]
    g.ggml_tensor_overhead.restype = ctypes.c_size_t

    desc = ModelDesc(b"qwen3", n_embd, n_ff, n_layer, n_head, n_head_kv, 0, head_dim, head_dim)
    model = from_meta(ctypes.byref(desc))
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    qs = init(model, ctypes.byref(params))
    ctx = g.ggml_init(_InitParams(g.ggml_tensor_overhead() * (len(tensors) + 1), None, True))
    try:
        ptrs = (p * len(tensors))()
        for i, (name, shape) in enumerate(tensors):
            ne = (ctypes.c_int64 * 4)(*reversed(shape), *([1] * (4 - len(shape))))
            t = g.ggml_new_tensor(ctx, input_type, len(shape), ne)
            g.ggml_set_name(t, name.encode())
            ptrs[i] = t
        out = (ctypes.c_int * len(tensors))()
        compute(qs, ftype, ptrs, out, len(tensors))
        return list(out)
    finally:
        g.ggml_free(ctx)
        free(qs)
        L.llama_model_free(model)
