"""MiniCPM-V 4.5 as data: GGUF names, the checkpoint <-> GGUF tensor table, and the model's constants.

One module for the converter (HF -> GGUF), the runtime (GGUF -> torch and llama.cpp) and the tests,
so they cannot drift apart:
- GGUF keys and tensor names come from gguf-py (`gguf.Keys`, `MODEL_TENSOR`/`TENSOR_NAMES`) wherever
  gguf-py has them; the few only llama.cpp's clip loader knows are spelled out with the reason
  (docs/llamacpp.md §2).
- `TENSORS` is the one table of every tensor of both files: its GGUF name, its checkpoint source,
  how the converter derives it and its shape as dimension names. The checkpoint validator, the
  synthetic checkpoint writer, the language-model and mmproj plans and the runtime's mmproj loader
  all read it (`tensors`, `checkpoint_shapes`).
- The reference model's constants (docs/reference-model.md): slice size, queries, head width,
  pixel normalization, slice defaults, stop tokens, the thinking tags and the sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import gguf
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

# ----------------------------------------------------------------------------------------------
# The reference model (docs/reference-model.md)

SCALE_RESOLUTION = 448  # slice side in pixels (§4)
PATCH_SIZE = 14  # vision patch side in pixels (§2.2)
QUERY_NUM = 64  # resampler queries = language-model positions per slot (§3.1)
RESAMPLER_HEAD_DIM = 128  # resampler heads are 128 wide: heads = width // 128 (§3.1)
CLIP_POS_BUCKETS = 70  # NaViT position buckets per side; clip.cpp hard-codes 70 (§2.3)
IMAGE_MEAN = (0.5, 0.5, 0.5)  # pixels are (x/255 - mean) / std per channel (§4.4)
IMAGE_STD = (0.5, 0.5, 0.5)
MAX_SLICE_NUMS = 9  # slices per image (§6.1)
VIDEO_MAX_SLICE_NUMS = 1  # the model card's video call: one slice per frame, no image ids (§5.2)
SLOT_TOKEN = "<unk>"  # what the reference's prompt holds at every embedding position (§5.1)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # generation stops at either (§6.3)
THINK_START, THINK_END = "<think>", "</think>"  # the reasoning block (§5.3)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


# The reference chat() without thinking sets all four; with thinking only the temperature, the rest
# being transformers' defaults of the inner language model (§6.2).
REFERENCE_SAMPLING = Sampling(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.03)
THINKING_SAMPLING = Sampling(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0)

# ----------------------------------------------------------------------------------------------
# GGUF identity (docs/llamacpp.md §2.1, §3.1)

ARCH_KEY = gguf.Keys.General.ARCHITECTURE
LM_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]  # "qwen3"
MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
PROJECTOR_TYPE = gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.RESAMPLER]  # "resampler"
MINICPMV_VERSION = 6  # clip.cpp: "version == 6 // MiniCPM-V 4.5"


class ClipKeys:
    """mmproj metadata keys. gguf-py names most of them; the MiniCPM-V ones only exist in clip.cpp."""

    PROJECTOR_TYPE = gguf.Keys.Clip.PROJECTOR_TYPE
    HAS_VISION_ENCODER = gguf.Keys.Clip.HAS_VISION_ENCODER
    HAS_TEXT_ENCODER = "clip.has_text_encoder"  # clip-impl.h KEY_HAS_TEXT_ENC (unread)
    HAS_MINICPMV_PROJECTOR = "clip.has_minicpmv_projector"  # written by the legacy script (unread)
    MINICPMV_VERSION = "clip.minicpmv_version"  # clip-impl.h KEY_MINICPMV_VERSION, INT32
    MINICPMV_QUERY_NUM = "clip.minicpmv_query_num"  # clip-impl.h KEY_MINICPMV_QUERY_NUM, UINT32
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


# ----------------------------------------------------------------------------------------------
# GGUF tensor names


def _name(kind: T, bid: int | None = None) -> str:
    name = TENSOR_NAMES[kind]
    return name.format(bid=bid) if bid is not None else name


TOKEN_EMBD = _name(T.TOKEN_EMBD) + ".weight"  # the language model's input embedding table

# mmproj tensors (without the .weight/.bias suffix where both exist)
V_PATCH_EMBD = _name(T.V_ENC_EMBD_PATCH)  # v.patch_embd
V_POS_EMBD = _name(T.V_ENC_EMBD_POS)  # v.position_embd
V_POST_LN = _name(T.V_POST_NORM)  # v.post_ln
R_QUERY = _name(T.V_RESMPL_QUERY)  # resampler.query (no suffix)
R_KV = _name(T.V_RESMPL_KV)  # resampler.kv
R_LN_Q = _name(T.V_RESMPL_Q_NORM)  # resampler.ln_q
R_LN_KV = _name(T.V_RESMPL_KV_NORM)  # resampler.ln_kv
R_LN_POST = _name(T.V_RESMPL_POST_NORM)  # resampler.ln_post
R_ATTN_Q = _name(T.V_RESMPL_ATTN_Q)  # resampler.attn.q
R_ATTN_K = _name(T.V_RESMPL_ATTN_K)
R_ATTN_V = _name(T.V_RESMPL_ATTN_V)
R_ATTN_OUT = _name(T.V_RESMPL_ATTN_OUT)  # resampler.attn.out
R_PROJ = _name(T.V_RESMPL_PROJ)  # resampler.proj (+ .weight)
# gguf-py spells this "resampler.pos_embd_k", but clip.cpp loads "resampler.pos_embed_k"
# (TN_MINICPMV_POS_EMBD_K) as a required tensor: the loader's spelling wins.
R_POS_EMBED_K = "resampler.pos_embed_k"

_V_BLOCK = {
    "attn_q": T.V_ENC_ATTN_Q,
    "attn_k": T.V_ENC_ATTN_K,
    "attn_v": T.V_ENC_ATTN_V,
    "attn_out": T.V_ENC_ATTN_O,
    "ln1": T.V_ENC_INPUT_NORM,
    "ln2": T.V_ENC_POST_ATTN_NORM,
    "ffn_up": T.V_ENC_FFN_UP,
    "ffn_down": T.V_ENC_FFN_DOWN,
}


def v_blk(kind: str, bid: int) -> str:
    """Per-layer vision tensor base name; kind in attn_q/attn_k/attn_v/attn_out/ln1/ln2/ffn_up/ffn_down."""
    return _name(_V_BLOCK[kind], bid)


# ----------------------------------------------------------------------------------------------
# The tensor table

LM, MMPROJ = "lm", "mmproj"  # the two GGUF files
Shape = tuple[str | int, ...]  # dimension names ("H", "3*H") or literal sizes

# Dimension names (`dims` maps them to sizes; the converter fills them from config.json, the runtime
# from the mmproj's hyper-parameters):
#   H hidden width of the language model = resampler width, V vocabulary, I ffn width,
#   Hq = heads * head_dim, Hkv = kv heads * head_dim, hd head_dim,
#   Hv vision width, Iv vision ffn width, P patch side, Np vision positions (buckets^2), Q queries.


@dataclass(frozen=True)
class TensorSpec:
    gguf: str  # GGUF name ("{bid}" = layer)
    hf: str | None  # checkpoint name ("{bid}" = layer); None: computed by the converter
    shape: Shape  # numpy shape (the reversed ggml ne) in the GGUF file
    file: str  # LM or MMPROJ
    blocks: bool = False  # one tensor per layer of its file's model
    take: str = "copy"  # copy | split:J (rows J of 3 of a packed q|k|v) | transpose | sincos
    hf_shape: Shape | None = None  # checkpoint shape where it differs from `shape`
    untied: bool = False  # present only without tie_word_embeddings


@dataclass(frozen=True)
class Tensor:
    """One tensor of a concrete model: a table row with the layer filled in and sizes resolved."""

    gguf: str
    hf: str | None
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...] | None  # None when the tensor has no checkpoint source
    take: str

    @property
    def computed(self) -> bool:
        return self.hf is None


def _lm_layer(kind: T, hf: str, shape: Shape) -> TensorSpec:
    return TensorSpec(_name(kind) + ".weight", f"llm.model.layers.{{bid}}.{hf}.weight", shape, LM, blocks=True)


def _v_layer(kind: str, hf: str, w: Shape, b: Shape) -> tuple[TensorSpec, TensorSpec]:
    base = TENSOR_NAMES[_V_BLOCK[kind]]
    return (
        TensorSpec(base + ".weight", f"vpm.encoder.layers.{{bid}}.{hf}.weight", w, MMPROJ, blocks=True),
        TensorSpec(base + ".bias", f"vpm.encoder.layers.{{bid}}.{hf}.bias", b, MMPROJ, blocks=True),
    )


def _pair(name: str, hf: str, w: Shape, b: Shape) -> tuple[TensorSpec, TensorSpec]:
    return (
        TensorSpec(name + ".weight", hf + ".weight", w, MMPROJ),
        TensorSpec(name + ".bias", hf + ".bias", b, MMPROJ),
    )


_IN_PROJ = "resampler.attn.in_proj_"  # nn.MultiheadAttention packs [Wq; Wk; Wv] along dim 0

# In file order: llama.cpp's order for the language model (token_embd, blocks, output_norm, output),
# the order of llama.cpp's legacy MiniCPM-V script for the mmproj (tower, then resampler). Consecutive
# per-layer rows are expanded layer by layer. Our files name fc1 ffn_up and fc2 ffn_down (the legacy
# script swaps them; clip.cpp and our runtime tell which from the shapes, docs/llamacpp.md §2.5).
TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec(TOKEN_EMBD, "llm.model.embed_tokens.weight", ("V", "H"), LM),
    _lm_layer(T.ATTN_NORM, "input_layernorm", ("H",)),
    _lm_layer(T.ATTN_Q, "self_attn.q_proj", ("Hq", "H")),
    _lm_layer(T.ATTN_K, "self_attn.k_proj", ("Hkv", "H")),
    _lm_layer(T.ATTN_V, "self_attn.v_proj", ("Hkv", "H")),
    _lm_layer(T.ATTN_OUT, "self_attn.o_proj", ("H", "Hq")),
    _lm_layer(T.ATTN_Q_NORM, "self_attn.q_norm", ("hd",)),
    _lm_layer(T.ATTN_K_NORM, "self_attn.k_norm", ("hd",)),
    _lm_layer(T.FFN_NORM, "post_attention_layernorm", ("H",)),
    _lm_layer(T.FFN_GATE, "mlp.gate_proj", ("I", "H")),
    _lm_layer(T.FFN_UP, "mlp.up_proj", ("I", "H")),
    _lm_layer(T.FFN_DOWN, "mlp.down_proj", ("H", "I")),
    TensorSpec(_name(T.OUTPUT_NORM) + ".weight", "llm.model.norm.weight", ("H",), LM),
    TensorSpec(_name(T.OUTPUT) + ".weight", "llm.lm_head.weight", ("V", "H"), LM, untied=True),
    *_pair(V_PATCH_EMBD, "vpm.embeddings.patch_embedding", ("Hv", 3, "P", "P"), ("Hv",)),
    TensorSpec(V_POS_EMBD + ".weight", "vpm.embeddings.position_embedding.weight", ("Np", "Hv"), MMPROJ),
    *_v_layer("attn_q", "self_attn.q_proj", ("Hv", "Hv"), ("Hv",)),
    *_v_layer("attn_k", "self_attn.k_proj", ("Hv", "Hv"), ("Hv",)),
    *_v_layer("attn_v", "self_attn.v_proj", ("Hv", "Hv"), ("Hv",)),
    *_v_layer("attn_out", "self_attn.out_proj", ("Hv", "Hv"), ("Hv",)),
    *_v_layer("ln1", "layer_norm1", ("Hv",), ("Hv",)),
    *_v_layer("ln2", "layer_norm2", ("Hv",), ("Hv",)),
    *_v_layer("ffn_up", "mlp.fc1", ("Iv", "Hv"), ("Iv",)),
    *_v_layer("ffn_down", "mlp.fc2", ("Hv", "Iv"), ("Hv",)),
    *_pair(V_POST_LN, "vpm.post_layernorm", ("Hv",), ("Hv",)),
    TensorSpec(R_QUERY, "resampler.query", ("Q", "H"), MMPROJ),
    TensorSpec(R_KV + ".weight", "resampler.kv_proj.weight", ("H", "Hv"), MMPROJ),
    *(
        TensorSpec(name + suffix, _IN_PROJ + hf_suffix, shape, MMPROJ, take=f"split:{j}", hf_shape=("3*H",) + shape[1:])
        for j, name in enumerate((R_ATTN_Q, R_ATTN_K, R_ATTN_V))
        for suffix, hf_suffix, shape in ((".weight", "weight", ("H", "H")), (".bias", "bias", ("H",)))
    ),
    *_pair(R_ATTN_OUT, "resampler.attn.out_proj", ("H", "H"), ("H",)),
    *_pair(R_LN_Q, "resampler.ln_q", ("H",), ("H",)),
    *_pair(R_LN_KV, "resampler.ln_kv", ("H",), ("H",)),
    *_pair(R_LN_POST, "resampler.ln_post", ("H",), ("H",)),
    # the reference computes x @ proj ([in, out]); a ggml/Linear weight is [out, in]
    TensorSpec(R_PROJ + ".weight", "resampler.proj", ("H", "H"), MMPROJ, take="transpose"),
    # required by clip.cpp but never read: the reference's 2-D sin-cos table (docs/reference-model.md §3.2)
    TensorSpec(R_POS_EMBED_K, None, (CLIP_POS_BUCKETS * CLIP_POS_BUCKETS, "H"), MMPROJ, take="sincos"),
)


def _size(dim: str | int, dims: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    factor, _, name = dim.rpartition("*")
    return int(factor or 1) * dims[name]


def _resolve(shape: Shape | None, dims: Mapping[str, int]) -> tuple[int, ...] | None:
    return None if shape is None else tuple(_size(d, dims) for d in shape)


def tensors(file: str, dims: Mapping[str, int], *, layers: int, tied: bool = False) -> list[Tensor]:
    """Every tensor of `file` (LM or MMPROJ) in file order, for a model with `layers` layers
    (text layers for LM, vision layers used for MMPROJ)."""
    rows = [s for s in TENSORS if s.file == file and not (tied and s.untied)]
    out: list[Tensor] = []
    i = 0
    while i < len(rows):
        n = 1
        while rows[i].blocks and i + n < len(rows) and rows[i + n].blocks:
            n += 1
        for bid in range(layers) if rows[i].blocks else [None]:
            for s in rows[i : i + n]:
                hf = s.hf.format(bid=bid) if s.hf is not None else None
                out.append(
                    Tensor(
                        s.gguf.format(bid=bid),
                        hf,
                        _resolve(s.shape, dims),
                        _resolve(s.hf_shape or s.shape, dims) if hf else None,
                        s.take,
                    )
                )
        i += n
    return out


def checkpoint_shapes(
    dims: Mapping[str, int], *, text_layers: int, vision_layers: int, tied: bool
) -> dict[str, tuple[int, ...]]:
    """Every tensor a MiniCPM-V 4.5 checkpoint holds, with its shape (packed tensors once)."""
    out: dict[str, tuple[int, ...]] = {}
    for file, layers in ((LM, text_layers), (MMPROJ, vision_layers)):
        for t in tensors(file, dims, layers=layers, tied=tied):
            if t.hf is not None:
                out.setdefault(t.hf, t.hf_shape)
    return out
