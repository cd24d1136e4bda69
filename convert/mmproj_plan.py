"""Vision tower + resampler (`vpm.*`, `resampler.*`) -> llama.cpp mmproj GGUF (clip, projector `resampler`).

The file is what llama.cpp's clip loader expects for MiniCPM-V 4.5 (minicpmv_version 6): the SigLIP
tower under `v.*`, the resampler under `resampler.*` with its packed attention projection split into
q/k/v, `proj` transposed into a Linear-style weight, and the (unused but required) 2-D sin-cos table
`resampler.pos_embed_k`. Key value types matter: clip.cpp asserts them on read.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, LlamaFileType
from gguf import GGMLQuantizationType as Q

from minicpmv import schema
from minicpmv.schema import CLIP_POS_BUCKETS, RESAMPLER_HEAD_DIM
from minicpmv.sincos import sincos_2d

from .checkpoint import Checkpoint
from .config import CheckpointError, MiniCPMVConfig
from .layout import dims, validate
from .plan import TensorPlan

# --mmproj-type -> (general.file_type, type of the weight matrices)
MMPROJ_TYPES: dict[str, tuple[LlamaFileType, Q]] = {
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}


def parse_mmproj_type(name: str) -> str:
    key = name.strip().lower()
    if key not in MMPROJ_TYPES:
        raise ValueError(f"--mmproj-type: unknown type {name!r}; valid: {', '.join(MMPROJ_TYPES)}")
    return key


# ----------------------------------------------------------------------------------------------
# tensor types


def tensor_type(name: str, shape: tuple[int, ...], mmproj_type: str) -> Q:
    """GGML type of one mmproj tensor (docs/llamacpp.md §2.4: what the CPU backend accepts).

    1-D tensors and `resampler.query` feed ggml_add/ggml_norm with an F32 activation -> F32.
    `pos_embed_k` is never read by llama.cpp; it stays the exact f32 table (as the legacy script).
    The position table (get_rows) and the patch conv (im2col) are never block-quantized.
    Block quantization needs rows that are a multiple of the block (fc2's 4304 is not -> F16)."""
    matrix = MMPROJ_TYPES[mmproj_type][1]
    if len(shape) == 1 or name in (schema.R_QUERY, schema.R_POS_EMBED_K):
        return Q.F32
    if name in (schema.V_POS_EMBD + ".weight", schema.V_PATCH_EMBD + ".weight"):
        return matrix if matrix in (Q.F32, Q.F16, Q.BF16) else Q.F16
    block = GGML_QUANT_SIZES[matrix][0]
    return matrix if shape[-1] % block == 0 else Q.F16


# ----------------------------------------------------------------------------------------------
# plans


def check_supported(cfg: MiniCPMVConfig, where: str) -> None:
    v, D = cfg.vision, cfg.text.hidden_size
    if v.num_patches_per_side != CLIP_POS_BUCKETS:
        raise CheckpointError(
            f"{where}: vision_config image_size {v.image_size} / patch_size {v.patch_size} gives "
            f"{v.num_patches_per_side} position buckets per side; llama.cpp's clip requires {CLIP_POS_BUCKETS}"
        )
    if v.hidden_size % v.num_attention_heads:
        raise CheckpointError(
            f"{where}: vision_config hidden_size {v.hidden_size} is not a multiple of "
            f"num_attention_heads {v.num_attention_heads}"
        )
    if D % RESAMPLER_HEAD_DIM:
        raise CheckpointError(
            f"{where}: hidden_size {D} is not a multiple of {RESAMPLER_HEAD_DIM} "
            f"(resampler heads are {RESAMPLER_HEAD_DIM} wide)"
        )


def mmproj_plans(ckpt: Checkpoint, cfg: MiniCPMVConfig, mmproj_type: str) -> list[TensorPlan]:
    """One plan per mmproj tensor, vision tower first, then the resampler."""
    mmproj_type = parse_mmproj_type(mmproj_type)
    check_supported(cfg, str(ckpt.dir / "config.json"))
    validate(ckpt, cfg, prefixes=("vpm.", "resampler."))
    plans: list[TensorPlan] = []
    for t in schema.tensors(schema.MMPROJ, dims(cfg), layers=cfg.vision_layers_used):
        load, load_rows = _loaders(ckpt, t)
        plans.append(
            TensorPlan(
                t.gguf,
                t.shape,
                load,
                tensor_type(t.gguf, t.shape, mmproj_type),
                source=t.hf or "(computed 2-D sin-cos)",
                load_rows=load_rows,
            )
        )
    return plans


def _loaders(ckpt: Checkpoint, t: schema.Tensor):
    """(whole-tensor loader, row-block loader or None) of one mmproj tensor, per the table's `take`."""
    hf = t.hf
    if t.take == "copy":
        return (lambda: ckpt.f32(hf)), (lambda a, b: ckpt.f32_rows(hf, a, b))
    if t.take.startswith("split:"):  # rows j*D .. (j+1)*D of the packed [Wq; Wk; Wv] (or biases)
        o = int(t.take.split(":")[1]) * t.shape[0]
        rows = None if len(t.shape) == 1 else (lambda a, b: ckpt.f32_rows(hf, o + a, o + b))
        return (lambda: ckpt.f32(hf)[o : o + t.shape[0]].copy()), rows
    if t.take == "transpose":
        return (lambda: np.ascontiguousarray(ckpt.f32(hf).T)), None
    if t.take == "sincos":
        n, d = CLIP_POS_BUCKETS, t.shape[-1]
        return (lambda: sincos_2d(d, n, n).reshape(n * n, d)), None
    raise ValueError(f"tensor {t.gguf}: unknown derivation {t.take!r}")


# ----------------------------------------------------------------------------------------------
# metadata


def add_mmproj_metadata(w: gguf.GGUFWriter, cfg: MiniCPMVConfig, mmproj_type: str, *, name: str) -> None:
    """Every key llama.cpp's clip loader reads for a MiniCPM-V 4.5 projector, with its exact value type."""
    mmproj_type = parse_mmproj_type(mmproj_type)
    v, K = cfg.vision, schema.ClipKeys
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_description(f"image encoder (SigLIP + resampler) for {name}")
    w.add_file_type(int(MMPROJ_TYPES[mmproj_type][0]))
    w.add_string(K.PROJECTOR_TYPE, schema.PROJECTOR_TYPE)
    w.add_bool(K.HAS_VISION_ENCODER, True)
    w.add_bool(K.HAS_TEXT_ENCODER, False)
    w.add_bool(K.HAS_MINICPMV_PROJECTOR, True)
    w.add_int32(K.MINICPMV_VERSION, schema.MINICPMV_VERSION)
    w.add_uint32(K.MINICPMV_QUERY_NUM, cfg.query_num)
    w.add_uint32(K.IMAGE_SIZE, cfg.image_size)  # the slice size (448), not the tower's 980
    w.add_uint32(K.PATCH_SIZE, v.patch_size)
    w.add_uint32(K.EMBEDDING_LENGTH, v.hidden_size)
    w.add_uint32(K.FEED_FORWARD_LENGTH, v.intermediate_size)
    w.add_uint32(K.PROJECTION_DIM, 0)
    w.add_uint32(K.HEAD_COUNT, v.num_attention_heads)
    w.add_float32(K.LAYERNORM_EPS, v.layer_norm_eps)
    w.add_uint32(K.BLOCK_COUNT, cfg.vision_layers_used)
    w.add_key_value(K.IMAGE_MEAN, list(schema.IMAGE_MEAN), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value(K.IMAGE_STD, list(schema.IMAGE_STD), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_bool(K.USE_GELU, True)  # tanh GELU; absent would mean gelu_quick
    w.add_uint32(K.POS_BUCKETS, v.num_patches_per_side)
