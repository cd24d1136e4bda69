"""Every GGUF name this project reads or writes, in one place.

Tensor and key names come from gguf-py (`gguf.MODEL_TENSOR`, `gguf.TENSOR_NAMES`, `gguf.Keys`)
wherever gguf-py has them; the few that only llama.cpp's clip loader knows (``clip.minicpmv_*``,
``resampler.pos_embed_k``) are spelled out here with the reason. The converter (HF -> GGUF) and the
runtime (GGUF -> torch) both import from this module, so the two can never drift apart.
"""

from __future__ import annotations

import re

import gguf
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

# ----------------------------------------------------------------------------------------------
# Language model (llama.cpp architecture `qwen3`)

LM_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]  # "qwen3"
LM_HF_PREFIX = "llm."

# HF name (after "llm.") -> (gguf tensor kind, takes a layer index)
_LM_GLOBAL = {
    "model.embed_tokens.weight": T.TOKEN_EMBD,
    "model.norm.weight": T.OUTPUT_NORM,
    "lm_head.weight": T.OUTPUT,
}
_LM_LAYER = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "self_attn.q_norm": T.ATTN_Q_NORM,
    "self_attn.k_norm": T.ATTN_K_NORM,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
_LM_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def lm_tensor_name(hf_name: str) -> str | None:
    """GGUF name of an `llm.*` checkpoint tensor, or None if the name is not a Qwen3 tensor."""
    if not hf_name.startswith(LM_HF_PREFIX):
        return None
    rest = hf_name[len(LM_HF_PREFIX):]
    if rest in _LM_GLOBAL:
        return TENSOR_NAMES[_LM_GLOBAL[rest]] + ".weight"
    m = _LM_LAYER_RE.match(rest)
    if m and m.group(2) in _LM_LAYER:
        return TENSOR_NAMES[_LM_LAYER[m.group(2)]].format(bid=int(m.group(1))) + ".weight"
    return None


def lm_expected_hf_names(n_layer: int) -> list[str]:
    """Every `llm.*` tensor a MiniCPM-V 4.5 checkpoint must hold (lm_head is untied)."""
    names = [LM_HF_PREFIX + n for n in _LM_GLOBAL]
    for i in range(n_layer):
        names += [f"{LM_HF_PREFIX}model.layers.{i}.{k}.weight" for k in _LM_LAYER]
    return names


# ----------------------------------------------------------------------------------------------
# Vision projector (mmproj, llama.cpp clip loader, projector type `resampler`)

MMPROJ_ARCH = "clip"
PROJECTOR_TYPE = gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.RESAMPLER]  # "resampler"
MINICPMV_VERSION = 6  # clip.cpp: "version == 6 // MiniCPM-V 4.5"


class ClipKeys:
    """mmproj metadata keys. gguf-py names most of them; the MiniCPM-V ones only exist in clip.cpp."""

    PROJECTOR_TYPE = gguf.Keys.Clip.PROJECTOR_TYPE
    HAS_VISION_ENCODER = gguf.Keys.Clip.HAS_VISION_ENCODER
    HAS_TEXT_ENCODER = "clip.has_text_encoder"            # clip-impl.h KEY_HAS_TEXT_ENC (unread)
    HAS_MINICPMV_PROJECTOR = "clip.has_minicpmv_projector"  # written by the legacy script (unread)
    MINICPMV_VERSION = "clip.minicpmv_version"            # clip-impl.h KEY_MINICPMV_VERSION, INT32
    MINICPMV_QUERY_NUM = "clip.minicpmv_query_num"        # clip-impl.h KEY_MINICPMV_QUERY_NUM, UINT32
    IMAGE_SIZE = gguf.Keys.ClipVision.IMAGE_SIZE
    PATCH_SIZE = gguf.Keys.ClipVision.PATCH_SIZE
    EMBEDDING_LENGTH = gguf.Keys.ClipVision.EMBEDDING_LENGTH
    FEED_FORWARD_LENGTH = gguf.Keys.ClipVision.FEED_FORWARD_LENGTH
    PROJECTION_DIM = gguf.Keys.ClipVision.PROJECTION_DIM
    BLOCK_COUNT = gguf.Keys.ClipVision.BLOCK_COUNT
    HEAD_COUNT = gguf.Keys.ClipVision.Attention.HEAD_COUNT
    LAYERNORM_EPS = gguf.Keys.ClipVision.Attention.LAYERNORM_EPS
    IMAGE_MEAN = gguf.Keys.ClipVision.IMAGE_MEAN
    IMAGE_STD = gguf.Keys.ClipVision.IMAGE_STD
    USE_GELU = gguf.Keys.ClipVision.USE_GELU
    # Not read by llama.cpp; lets our runtime rebuild the vision position table and the
    # resampler's sin-cos tables exactly as the reference (980/14 = 70 buckets per side).
    POS_BUCKETS = "minicpmv.vision.position_buckets"


def _v(kind: T, bid: int | None = None) -> str:
    name = TENSOR_NAMES[kind]
    return name.format(bid=bid) if bid is not None else name


# Names of the mmproj tensors (without the .weight/.bias suffix where both exist).
V_PATCH_EMBD = _v(T.V_ENC_EMBD_PATCH)          # v.patch_embd
V_POS_EMBD = _v(T.V_ENC_EMBD_POS)              # v.position_embd
V_POST_LN = _v(T.V_POST_NORM)                  # v.post_ln
R_QUERY = _v(T.V_RESMPL_QUERY)                 # resampler.query (no suffix)
R_KV = _v(T.V_RESMPL_KV)                       # resampler.kv
R_LN_Q = _v(T.V_RESMPL_Q_NORM)                 # resampler.ln_q
R_LN_KV = _v(T.V_RESMPL_KV_NORM)               # resampler.ln_kv
R_LN_POST = _v(T.V_RESMPL_POST_NORM)           # resampler.ln_post
R_ATTN_Q = _v(T.V_RESMPL_ATTN_Q)               # resampler.attn.q
R_ATTN_K = _v(T.V_RESMPL_ATTN_K)
R_ATTN_V = _v(T.V_RESMPL_ATTN_V)
R_ATTN_OUT = _v(T.V_RESMPL_ATTN_OUT)           # resampler.attn.out
R_PROJ = _v(T.V_RESMPL_PROJ)                   # resampler.proj (+ .weight)
# gguf-py spells this "resampler.pos_embd_k", but clip.cpp loads "resampler.pos_embed_k"
# (TN_MINICPMV_POS_EMBD_K) as a required tensor: the loader's spelling wins.
R_POS_EMBED_K = "resampler.pos_embed_k"


def v_blk(kind: str, bid: int) -> str:
    """Per-layer vision tensor base name; kind in attn_q/attn_k/attn_v/attn_out/ln1/ln2/ffn_up/ffn_down."""
    kinds = {
        "attn_q": T.V_ENC_ATTN_Q, "attn_k": T.V_ENC_ATTN_K, "attn_v": T.V_ENC_ATTN_V,
        "attn_out": T.V_ENC_ATTN_O, "ln1": T.V_ENC_INPUT_NORM, "ln2": T.V_ENC_POST_ATTN_NORM,
        "ffn_up": T.V_ENC_FFN_UP, "ffn_down": T.V_ENC_FFN_DOWN,
    }
    return _v(kinds[kind], bid)


# HF vision suffix (after "vpm.encoder.layers.N.") -> per-layer kind. Our files use the natural
# naming (fc1 -> ffn_up, fc2 -> ffn_down). llama.cpp's legacy MiniCPM-V script swaps them (fc1 ->
# ffn_down); clip.cpp and our runtime detect which by the tensor shapes.
VISION_LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
