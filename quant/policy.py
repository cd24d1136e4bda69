"""Per-tensor output type for the language model: llama-quantize's rules (src/llama-quant.cpp).

Mirrors, for a dense model (no experts, not Falcon, not a 70B llama) and the mixtures listed in SPECS:
  tensor_allows_quantization -> llama_tensor_get_type_impl (output.weight, attn_v, ffn_down mixes)
  -> tensor_type_fallback (row length not a multiple of the block size).
The per-layer counters advance in llama-quantize's tensor order: the model loader's weights_map,
sorted by the `blk.N.` number (tensors without one first), then by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class QuantSpec:
    name: str                 # canonical, e.g. "Q4_K_M", "F16"
    ftype: LlamaFileType      # general.file_type / llama_ftype
    default: Q                # type of the tensors the mixture does not single out


F = LlamaFileType
SPECS = {s.name: s for s in (
    QuantSpec("F32", F.ALL_F32, Q.F32),
    QuantSpec("F16", F.MOSTLY_F16, Q.F16),
    QuantSpec("BF16", F.MOSTLY_BF16, Q.BF16),
    QuantSpec("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0),
    QuantSpec("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0),
    QuantSpec("Q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
    QuantSpec("Q5_0", F.MOSTLY_Q5_0, Q.Q5_0),
    QuantSpec("Q5_1", F.MOSTLY_Q5_1, Q.Q5_1),
    QuantSpec("Q4_K_S", F.MOSTLY_Q4_K_S, Q.Q4_K),
    QuantSpec("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K),
    QuantSpec("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K),
    QuantSpec("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K),
    QuantSpec("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K),
)}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}   # as llama-quantize's QUANT_OPTIONS

UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)
# tensor_type_fallback: a 256-block type whose row length does not divide falls back to a 32-block one
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0}

# substrings that keep a 2-D+ "...weight" tensor unquantized (tensor_allows_quantization)
_KEEP = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
         "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
         "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
         "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
         "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
         "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
         "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
         "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_KEEP_EXACT = ("position_embd.weight", "token_types.weight")


def parse_type(name: str) -> QuantSpec:
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    try:
        return SPECS[key]
    except KeyError:
        raise ValueError(f"unknown quantization type {name!r}; valid types: {', '.join(SPECS)}") from None


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last ne != 1 (ne is the reversed numpy shape)."""
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] != 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: tuple[int, ...], quantize_output: bool = True) -> bool:
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    return name not in _KEEP_EXACT and not any(k in name for k in _KEEP)


def category(name: str) -> str:
    """tensor_get_category (first match wins; substring tests like llama.cpp)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat   # attn_qkv / attn_kv_b are "attn_v-like"; their own branch is never reached
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_order(names: list[str]) -> list[int]:
    """Indices of `names` in llama_model_loader weights_map order (blk.N number, then name)."""
    def key(i: int):
        m = re.match(r"blk\.(-?\d+)\.", names[i])
        return (int(m.group(1)) if m else -1, names[i].encode())
    return sorted(range(len(names)), key=key)


def lm_tensor_types(tensors: list[tuple[str, tuple[int, ...]]], spec: QuantSpec, n_layer: int,
                    has_imatrix: bool = False, input_type: Q = Q.F32) -> list[Q]:
    """GGML type of each (gguf name, numpy shape), in the given order, as llama-quantize picks it
    for a file whose tensors are all in `input_type` (norms/1-D keep it). `has_imatrix` matters: with
    an importance matrix Q4_0/Q5_0 give the first ffn_down layers Q4_1/Q5_1."""
    names = [n for n, _ in tensors]
    ftype, default = spec.ftype, spec.default
    n_attn_v = sum(category(n) == "attn_v" for n in names)
    tied = "output.weight" not in names
    i_attn_v = i_ffn_down = 0
    types: list[Q] = [input_type] * len(tensors)

    for idx in llama_order(names):
        name, shape = tensors[idx]
        if not allows_quantization(name, shape):
            continue
        if default in UNQUANTIZED:
            types[idx] = default
            continue
        cat, ne0, new = category(name), shape[-1], default
        if cat == "output" or (tied and cat == "token_embd"):
            if ne0 % _block(new):
                new = Q.Q8_0
            elif new != Q.Q8_0:
                new = Q.Q6_K
        elif cat == "attn_v":
            if ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(i_attn_v, n_attn_v):
                new = Q.Q6_K
            elif ftype == F.MOSTLY_Q4_K_S and i_attn_v < 4:
                new = Q.Q5_K
            i_attn_v += 1
        elif cat == "ffn_down":
            i, n = i_ffn_down, n_layer
            if ftype == F.MOSTLY_Q4_K_M:
                if use_more_bits(i, n):
                    new = Q.Q6_K
            elif ftype == F.MOSTLY_Q5_K_M and use_more_bits(i, n):
                new = Q.Q6_K
            elif ftype == F.MOSTLY_Q4_K_S and i < n // 8:
                new = Q.Q5_K
            elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and has_imatrix and i < n // 8:
                new = Q.Q4_1 if ftype == F.MOSTLY_Q4_0 else Q.Q5_1
            i_ffn_down += 1
        types[idx] = fallback(new, ne0)
    return types


def fallback(t: Q, ne0: int) -> Q:
    """tensor_type_fallback: the type actually used for rows of ne0 elements."""
    if ne0 % _block(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    if _block(t) > 32:
        raise ValueError(f"no fallback type is defined for {t.name}")
    return t if ne0 % _block(t) == 0 else Q.F16


def _block(t: Q) -> int:
    return GGML_QUANT_SIZES[t][0]
