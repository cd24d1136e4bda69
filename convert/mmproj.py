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

from . import names
from .checkpoint import Checkpoint
from .config import CheckpointError, MiniCPMVConfig
from .layout import validate
from .plan import TensorPlan

# --mmproj-type -> (general.file_type, type of the weight matrices)
MMPROJ_TYPES: dict[str, tuple[LlamaFileType, Q]] = {
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}

# clip.cpp hard-codes 70 position buckets per side (floor(70*i/n)) and a resampler head size of 128.
CLIP_POS_BUCKETS = 70
RESAMPLER_HEAD_DIM = 128


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
    if len(shape) == 1 or name in (names.R_QUERY, names.R_POS_EMBED_K):
        return Q.F32
    if name in (names.V_POS_EMBD + ".weight", names.V_PATCH_EMBD + ".weight"):
        return matrix if matrix in (Q.F32, Q.F16, Q.BF16) else Q.F16
    block = GGML_QUANT_SIZES[matrix][0]
    return matrix if shape[-1] % block == 0 else Q.F16


# ----------------------------------------------------------------------------------------------
# the 2-D sin-cos table (reference resampler, numpy float32)

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[..., dim]: all sines then all cosines of pos * omega_k, omega_k = 1/10000^(k/(dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega
    out = pos[..., None].astype(np.float32) * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """[rows, cols, dim] table; the first dim/2 channels encode the COLUMN, the last dim/2 the ROW."""
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, c), sincos_1d(dim // 2, r)], axis=-1)


# ----------------------------------------------------------------------------------------------
# plans

def check_supported(cfg: MiniCPMVConfig, where: str) -> None:
    v, D = cfg.vision, cfg.text.hidden_size
    if v.num_patches_per_side != CLIP_POS_BUCKETS:
        raise CheckpointError(
            f"{where}: vision_config image_size {v.image_size} / patch_size {v.patch_size} gives "
            f"{v.num_patches_per_side} position buckets per side; llama.cpp's clip requires {CLIP_POS_BUCKETS}")
    if v.hidden_size % v.num_attention_heads:
        raise CheckpointError(f"{where}: vision_config hidden_size {v.hidden_size} is not a multiple of "
                              f"num_attention_heads {v.num_attention_heads}")
    if D % RESAMPLER_HEAD_DIM:
        raise CheckpointError(f"{where}: hidden_size {D} is not a multiple of {RESAMPLER_HEAD_DIM} "
                              f"(resampler heads are {RESAMPLER_HEAD_DIM} wide)")


def mmproj_plans(ckpt: Checkpoint, cfg: MiniCPMVConfig, mmproj_type: str) -> list[TensorPlan]:
    """One plan per mmproj tensor, vision tower first, then the resampler."""
    mmproj_type = parse_mmproj_type(mmproj_type)
    check_supported(cfg, str(ckpt.dir / "config.json"))
    validate(ckpt, cfg, prefixes=("vpm.", "resampler."))
    D = cfg.text.hidden_size
    plans: list[TensorPlan] = []

    def add(name: str, shape: tuple[int, ...], load, source: str, load_rows=None) -> None:
        plans.append(TensorPlan(name, tuple(shape), load, tensor_type(name, tuple(shape), mmproj_type),
                                source=source, load_rows=load_rows))

    def copy(name: str, hf: str) -> None:
        add(name, ckpt.shape(hf), lambda: ckpt.f32(hf), hf, lambda a, b: ckpt.f32_rows(hf, a, b))

    copy(names.V_PATCH_EMBD + ".weight", "vpm.embeddings.patch_embedding.weight")  # 4-D, kept
    copy(names.V_PATCH_EMBD + ".bias", "vpm.embeddings.patch_embedding.bias")
    copy(names.V_POS_EMBD + ".weight", "vpm.embeddings.position_embedding.weight")
    for i in range(cfg.vision_layers_used):
        for hf_part, kind in names.VISION_LAYER_MAP.items():
            for suffix in ("weight", "bias"):
                copy(f"{names.v_blk(kind, i)}.{suffix}", f"vpm.encoder.layers.{i}.{hf_part}.{suffix}")
    copy(names.V_POST_LN + ".weight", "vpm.post_layernorm.weight")
    copy(names.V_POST_LN + ".bias", "vpm.post_layernorm.bias")

    copy(names.R_QUERY, "resampler.query")
    copy(names.R_KV + ".weight", "resampler.kv_proj.weight")
    # nn.MultiheadAttention packs [Wq; Wk; Wv] (and the biases) along dim 0
    for j, dst in enumerate((names.R_ATTN_Q, names.R_ATTN_K, names.R_ATTN_V)):
        rows = slice(j * D, (j + 1) * D)
        add(dst + ".weight", (D, D), lambda r=rows: ckpt.f32("resampler.attn.in_proj_weight")[r].copy(),
            "resampler.attn.in_proj_weight",
            lambda a, b, o=j * D: ckpt.f32_rows("resampler.attn.in_proj_weight", o + a, o + b))
        add(dst + ".bias", (D,), lambda r=rows: ckpt.f32("resampler.attn.in_proj_bias")[r].copy(),
            "resampler.attn.in_proj_bias")
    copy(names.R_ATTN_OUT + ".weight", "resampler.attn.out_proj.weight")
    copy(names.R_ATTN_OUT + ".bias", "resampler.attn.out_proj.bias")
    for ln, hf in ((names.R_LN_Q, "ln_q"), (names.R_LN_KV, "ln_kv"), (names.R_LN_POST, "ln_post")):
        copy(ln + ".weight", f"resampler.{hf}.weight")
        copy(ln + ".bias", f"resampler.{hf}.bias")
    # the reference computes x @ proj ([in, out]); a ggml/Linear weight is [out, in]
    add(names.R_PROJ + ".weight", (D, D), lambda: np.ascontiguousarray(ckpt.f32("resampler.proj").T),
        "resampler.proj")
    n = CLIP_POS_BUCKETS
    add(names.R_POS_EMBED_K, (n * n, D), lambda: sincos_2d(D, n, n).reshape(n * n, D), "(computed 2-D sin-cos)")
    return plans


# ----------------------------------------------------------------------------------------------
# metadata

def add_mmproj_metadata(w: gguf.GGUFWriter, cfg: MiniCPMVConfig, mmproj_type: str, *, name: str) -> None:
    """Every key llama.cpp's clip loader reads for a MiniCPM-V 4.5 projector, with its exact value type."""
    mmproj_type = parse_mmproj_type(mmproj_type)
    v, K = cfg.vision, names.ClipKeys
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_description(f"image encoder (SigLIP + resampler) for {name}")
    w.add_file_type(int(MMPROJ_TYPES[mmproj_type][0]))
    w.add_string(K.PROJECTOR_TYPE, names.PROJECTOR_TYPE)
    w.add_bool(K.HAS_VISION_ENCODER, True)
    w.add_bool(K.HAS_TEXT_ENCODER, False)
    w.add_bool(K.HAS_MINICPMV_PROJECTOR, True)
    w.add_int32(K.MINICPMV_VERSION, names.MINICPMV_VERSION)
    w.add_uint32(K.MINICPMV_QUERY_NUM, cfg.query_num)
    w.add_uint32(K.IMAGE_SIZE, cfg.image_size)  # the slice size (448), not the tower's 980
    w.add_uint32(K.PATCH_SIZE, v.patch_size)
    w.add_uint32(K.EMBEDDING_LENGTH, v.hidden_size)
    w.add_uint32(K.FEED_FORWARD_LENGTH, v.intermediate_size)
    w.add_uint32(K.PROJECTION_DIM, 0)
    w.add_uint32(K.HEAD_COUNT, v.num_attention_heads)
    w.add_float32(K.LAYERNORM_EPS, v.layer_norm_eps)
    w.add_uint32(K.BLOCK_COUNT, cfg.vision_layers_used)
    w.add_key_value(K.IMAGE_MEAN, [0.5, 0.5, 0.5], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value(K.IMAGE_STD, [0.5, 0.5, 0.5], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_bool(K.USE_GELU, True)  # tanh GELU; absent would mean gelu_quick
    w.add_uint32(K.POS_BUCKETS, v.num_patches_per_side)
