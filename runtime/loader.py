"""Loading a MiniCPM-V 4.5 pair: the mmproj into the torch vision encoder, the language model into
llama.cpp, checked against each other, with the context settings the chat engine sizes its context
from (context_size.py)."""

from __future__ import annotations

import os
from pathlib import Path

from minicpmv.cpu import default_threads
from minicpmv.gguf_info import ModelFileError, model_pair

from . import compute_thread
from .llama import LlamaModel
from .llama_backend import LlamaError
from .llama_context import KV_TYPES, ContextParams


def load_pair(
    model_path: str | os.PathLike,
    mmproj_path: str | os.PathLike | None = None,
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int | None = None,
    vision_dtype: str = "auto",
    n_batch: int = 512,
    kv_type: str | None = None,
    flash_attn: bool | None = None,
    verbose: bool = False,
    low_memory: bool = False,
):
    """(LlamaModel, VisionEncoder, ContextParams) for MiniCPMV.load (its docstring has the options).
    ValueError for contradicting options, ModelFileError (one line) for files that cannot be used."""
    kv_type = kv_type or ("q8_0" if low_memory else "f16")
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type: {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    if kv_type == "q8_0" and flash_attn is False:
        raise ValueError("kv_type q8_0 needs flash attention (flash_attn None or True)")
    model_path, mmproj_path = model_pair(model_path, mmproj_path)

    from .vision import VisionEncoder

    threads = n_threads or default_threads()
    try:
        vision = VisionEncoder.load(
            mmproj_path,
            dtype=vision_dtype,
            n_threads=threads,
            **(dict(resident=False, sub_batch_tokens=1) if low_memory else {}),
        )
    except (ValueError, OSError) as e:
        raise ModelFileError(str(e).splitlines()[0] if str(e) else f"{mmproj_path}: cannot load") from None
    try:
        lm = compute_thread.run(LlamaModel, model_path, n_gpu_layers=n_gpu_layers, verbose=verbose)  # may repack
    except LlamaError as e:
        raise ModelFileError(str(e)) from None
    check_pair(vision, lm)
    trained = lm.n_ctx_train  # read before close(): it asks the llama.cpp model, which close() frees
    if n_ctx is not None and 0 < trained < n_ctx:
        vision.close()
        lm.close()
        raise ValueError(f"n_ctx {n_ctx} is more than the {trained} positions {Path(model_path).name} was trained with")
    params = ContextParams(n_ctx=n_ctx or 0, n_batch=n_batch, n_threads=threads, kv_type=kv_type, flash_attn=flash_attn)
    return lm, vision, params


def check_pair(vision, lm: LlamaModel) -> None:
    """ModelFileError unless the mmproj's embeddings are as wide as the language model's input."""
    if vision is not None and vision.embed_dim != lm.n_embd:
        raise ModelFileError(
            f"{vision.path}: mmproj produces {vision.embed_dim}-wide embeddings but the "
            f"language model {lm.path.name} expects {lm.n_embd}; use the matching pair"
        )
