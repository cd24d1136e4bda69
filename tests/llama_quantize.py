"""The two-step path's second step: llama.cpp's own `llama_model_quantize` on a GGUF file.

Used as the oracle in tests and as the baseline in the benchmark. It does what the `llama-quantize`
tool does with the same arguments: the importance matrix is read with our reader (same math as the
tool's load_imatrix), every entry is handed over, and the tool's `quantize.imatrix.*` keys are added.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from minicpmv.quant.imatrix import imatrix_metadata, read_imatrix
from minicpmv.quant.policy import parse_type


def quantize_model_with_llama_cpp(
    src_gguf: Path,
    dst_gguf: Path,
    type_name: str,
    imatrix: Path | dict[str, np.ndarray] | None = None,
    nthread: int = 0,
    verbose: bool = False,
) -> Path:
    """Quantize `src_gguf` to `dst_gguf` with llama.cpp (nthread <= 0: all hardware threads).
    llama.cpp's per-tensor log goes to stderr only with `verbose`."""
    import llama_cpp as L
    from llama_cpp._logger import logger

    spec = parse_type(type_name)
    params = L.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = int(spec.ftype)
    keep: list = []  # ctypes buffers referenced by params must outlive the call

    if imatrix is not None:
        meta: dict[str, str | int] = {}
        if isinstance(imatrix, dict):
            values = imatrix
        else:
            values = read_imatrix(Path(imatrix)).values
            meta = imatrix_metadata(Path(imatrix))
        entries = (L.llama_model_imatrix_data * (len(values) + 1))()
        for e, (name, v) in zip(entries, values.items()):
            arr = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(arr)
            e.name = name.encode()
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = arr.size
        entries[len(values)].name = None  # terminator
        params.imatrix = entries
        keep.append(entries)
        if meta:
            kvs = (L.llama_model_kv_override * (len(meta) + 1))()
            for o, (key, val) in zip(kvs, meta.items()):
                o.key = key.encode()
                if isinstance(val, str):
                    o.tag, o.value.val_str = L.LLAMA_KV_OVERRIDE_TYPE_STR, val.encode()[:127]
                else:
                    o.tag, o.value.val_i64 = L.LLAMA_KV_OVERRIDE_TYPE_INT, val
            kvs[len(meta)].key = b""  # terminator: empty key
            params.kv_overrides = kvs
            keep.append(kvs)

    dst_gguf = Path(dst_gguf)
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        rc = L.llama_model_quantize(str(src_gguf).encode(), str(dst_gguf).encode(), ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if rc != 0:
        dst_gguf.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed on {src_gguf} -> {type_name} (code {rc})")
    return dst_gguf
