"""Per-tensor output type for the language model: llama-quantize's rules (src/llama-quant.cpp).

Mirrors, for a dense model (no experts, not Falcon, not a 70B llama), every mixture listed in SPECS:
  tensor_allows_quantization -> llama_tensor_get_type_impl -> tensor_type_fallback (row length not a
  multiple of the block size) -> tensor_requires_imatrix (the very-low-bit types refuse to run without
  an importance matrix).
llama.cpp writes the mixtures as one if-chain over (category, ftype); here each QuantSpec carries its
own rules as data, one ordered list of (condition, type) per tensor category, first match wins, no
match keeps the default type. Conditions see the tensor's position as llama-quantize's counters do:
they advance in its tensor order (the model loader's weights_map, sorted by the `blk.N.` number,
tensors without one first, then by name), so for a dense model the counter is the layer index.

Size: over 350 lines because SPECS is data, llama-quantize's mixture for every type (one entry of
a few lines each); the code around it is about 200 lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class Position:
    """What a rule may look at: index among the tensors of its category and how many there are
    (attn_v: the number of attn_v tensors; ffn_*: the number of layers), the model's
    n_head / n_head_kv (integer division, as llama_hparams::n_gqa), whether an imatrix is given."""

    i: int
    n: int
    n_gqa: int
    imatrix: bool


Cond = Callable[[Position], bool]
Rule = tuple[tuple[Cond, Q], ...]


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# conditions of llama_tensor_get_type_impl, named
def ALWAYS(p: Position) -> bool:
    return True  # noqa: E704


def GQA4(p: Position) -> bool:
    return p.n_gqa >= 4  # noqa: E704


def FIRST_8TH(p: Position) -> bool:
    return p.i < p.n // 8  # noqa: E704


def FIRST_16TH(p: Position) -> bool:
    return p.i < p.n // 16  # noqa: E704


def MORE_BITS(p: Position) -> bool:
    return use_more_bits(p.i, p.n)  # noqa: E704


def MIDDLE(p: Position) -> bool:
    return p.n // 8 <= p.i < 7 * p.n // 8  # noqa: E704


def NO_IMATRIX(p: Position) -> bool:
    return not p.imatrix  # noqa: E704


def IMATRIX(p: Position) -> bool:
    return p.imatrix  # noqa: E704


def first(k: int) -> Cond:
    return lambda p: p.i < k


def both(a: Cond, b: Cond) -> Cond:
    return lambda p: a(p) and b(p)


@dataclass(frozen=True)
class QuantSpec:
    name: str  # canonical, e.g. "Q4_K_M", "F16"
    ftype: LlamaFileType  # general.file_type / llama_ftype
    default: Q  # type of the tensors the mixture does not single out
    output: Q = Q.Q6_K  # output.weight (and a tied token_embd) when its rows fit the default's blocks
    token_embd: Q | None = None  # an untied token_embd.weight (None: the default type)
    rules: dict[str, Rule] = field(default_factory=dict)  # category -> ordered (condition, type)
    requires_imatrix: frozenset = frozenset()  # types that refuse to be made without an imatrix here

    @property
    def quantized(self) -> bool:
        return self.default not in UNQUANTIZED


F = LlamaFileType
UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)
# tensor_requires_imatrix: these targets need one (Q2_K only inside a Q2_K_S file)
_NEEDS_IMATRIX = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})


def _spec(name: str, ftype: F, default: Q, **kw) -> QuantSpec:
    needs = _NEEDS_IMATRIX | ({Q.Q2_K} if ftype == F.MOSTLY_Q2_K_S else set())
    return QuantSpec(name, ftype, default, requires_imatrix=frozenset(needs), **kw)


# the IQ1/IQ2 group of llama_tensor_get_type_impl shares one branch
def _iq12(name: str, ftype: F, default: Q, *, wide: Q, out: Q | None) -> QuantSpec:
    rules = {"attn_v": ((GQA4, Q.Q4_K), (ALWAYS, wide)), "ffn_down": ((FIRST_8TH, wide),)}
    if out is not None:
        rules["attn_output"] = ((ALWAYS, out),)
    return _spec(name, ftype, default, output=Q.Q5_K, token_embd=Q.IQ3_S if wide == Q.IQ3_S else Q.Q2_K, rules=rules)


SPECS = {
    s.name: s
    for s in (
        _spec("F32", F.ALL_F32, Q.F32),
        _spec("F16", F.MOSTLY_F16, Q.F16),
        _spec("BF16", F.MOSTLY_BF16, Q.BF16),
        _spec("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0, output=Q.Q8_0),
        _spec("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K),
        _spec(
            "Q5_K_M",
            F.MOSTLY_Q5_K_M,
            Q.Q5_K,
            rules={"attn_v": ((MORE_BITS, Q.Q6_K),), "ffn_down": ((MORE_BITS, Q.Q6_K),)},
        ),
        _spec("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K),
        _spec("Q5_1", F.MOSTLY_Q5_1, Q.Q5_1),
        _spec("Q5_0", F.MOSTLY_Q5_0, Q.Q5_0, rules={"ffn_down": ((both(FIRST_8TH, IMATRIX), Q.Q5_1),)}),
        _spec(
            "Q4_K_M",
            F.MOSTLY_Q4_K_M,
            Q.Q4_K,
            rules={"attn_v": ((MORE_BITS, Q.Q6_K),), "ffn_down": ((MORE_BITS, Q.Q6_K),)},
        ),
        _spec(
            "Q4_K_S",
            F.MOSTLY_Q4_K_S,
            Q.Q4_K,
            rules={"attn_v": ((first(4), Q.Q5_K),), "ffn_down": ((FIRST_8TH, Q.Q5_K),)},
        ),
        _spec("Q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
        _spec("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0, rules={"ffn_down": ((both(FIRST_8TH, IMATRIX), Q.Q4_1),)}),
        _spec(
            "IQ4_NL",
            F.MOSTLY_IQ4_NL,
            Q.IQ4_NL,
            rules={"attn_v": ((GQA4, Q.Q5_K),), "ffn_down": ((both(FIRST_8TH, NO_IMATRIX), Q.Q5_K),)},
        ),
        _spec(
            "IQ4_XS",
            F.MOSTLY_IQ4_XS,
            Q.IQ4_XS,
            rules={"attn_v": ((GQA4, Q.Q5_K),), "ffn_down": ((both(FIRST_8TH, NO_IMATRIX), Q.Q5_K),)},
        ),
        _spec(
            "Q3_K_L",
            F.MOSTLY_Q3_K_L,
            Q.Q3_K,
            rules={"attn_v": ((ALWAYS, Q.Q5_K),), "ffn_down": ((ALWAYS, Q.Q5_K),), "attn_output": ((ALWAYS, Q.Q5_K),)},
        ),
        _spec(
            "Q3_K_M",
            F.MOSTLY_Q3_K_M,
            Q.Q3_K,
            rules={
                "attn_v": ((first(2), Q.Q5_K), (ALWAYS, Q.Q4_K)),
                "ffn_down": ((FIRST_16TH, Q.Q5_K), (ALWAYS, Q.Q4_K)),
                "attn_output": ((ALWAYS, Q.Q4_K),),
            },
        ),
        _spec("Q3_K_S", F.MOSTLY_Q3_K_S, Q.Q3_K),
        _spec(
            "IQ3_M",
            F.MOSTLY_IQ3_M,
            Q.IQ3_S,
            rules={
                "attn_v": ((ALWAYS, Q.Q4_K),),
                "ffn_down": ((FIRST_8TH, Q.Q4_K),),
                "attn_output": ((ALWAYS, Q.Q4_K),),
            },
        ),
        _spec("IQ3_S", F.MOSTLY_IQ3_S, Q.IQ3_S, rules={"attn_v": ((GQA4, Q.Q4_K),)}),
        _spec(
            "IQ3_XS",
            F.MOSTLY_IQ3_XS,
            Q.IQ3_S,
            rules={
                "attn_v": ((GQA4, Q.Q4_K),),
                "attn_k": ((ALWAYS, Q.IQ3_XXS),),
                "attn_q": ((ALWAYS, Q.IQ3_XXS),),
                "ffn_gate": ((MIDDLE, Q.IQ3_XXS),),
                "ffn_up": ((MIDDLE, Q.IQ3_XXS),),
            },
        ),
        _spec(
            "IQ3_XXS",
            F.MOSTLY_IQ3_XXS,
            Q.IQ3_XXS,
            output=Q.Q5_K,
            token_embd=Q.IQ3_S,
            rules={
                "attn_v": ((GQA4, Q.Q4_K), (NO_IMATRIX, Q.IQ3_S)),
                "attn_k": ((ALWAYS, Q.IQ2_S),),
                "attn_q": ((ALWAYS, Q.IQ2_S),),
                "attn_output": ((ALWAYS, Q.IQ3_S),),
                "ffn_down": ((both(FIRST_8TH, NO_IMATRIX), Q.Q4_K), (NO_IMATRIX, Q.Q3_K)),
            },
        ),
        _spec(
            "Q2_K",
            F.MOSTLY_Q2_K,
            Q.Q2_K,
            rules={
                "attn_v": ((GQA4, Q.Q4_K), (ALWAYS, Q.Q3_K)),
                "ffn_down": ((ALWAYS, Q.Q3_K),),
                "attn_output": ((ALWAYS, Q.Q3_K),),
            },
        ),
        _spec(
            "Q2_K_S", F.MOSTLY_Q2_K_S, Q.Q2_K, rules={"attn_v": ((GQA4, Q.Q4_K),), "ffn_down": ((FIRST_8TH, Q.Q4_K),)}
        ),
        _iq12("IQ2_M", F.MOSTLY_IQ2_M, Q.IQ2_S, wide=Q.IQ3_S, out=Q.IQ3_S),
        _iq12("IQ2_S", F.MOSTLY_IQ2_S, Q.IQ2_XS, wide=Q.IQ3_S, out=Q.IQ3_S),
        _iq12("IQ2_XS", F.MOSTLY_IQ2_XS, Q.IQ2_XS, wide=Q.Q2_K, out=None),
        _iq12("IQ2_XXS", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, wide=Q.Q2_K, out=None),
        _iq12("IQ1_M", F.MOSTLY_IQ1_M, Q.IQ1_M, wide=Q.Q2_K, out=Q.IQ2_XXS),
        _iq12("IQ1_S", F.MOSTLY_IQ1_S, Q.IQ1_S, wide=Q.Q2_K, out=Q.IQ2_XXS),
    )
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize's QUANT_OPTIONS

# tensor_type_fallback: a type whose block does not divide the row length falls back to a 32-block one
FALLBACK = {
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS)},
}

# substrings that keep a 2-D+ "...weight" tensor unquantized (tensor_allows_quantization)
_KEEP = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
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


@lru_cache(maxsize=4096)  # the size table asks for the same 8B tensors once per type
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
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat  # attn_qkv / attn_kv_b are "attn_v-like"; their own branch is never reached
    return "other"


_BLK = re.compile(r"blk\.(-?\d+)\.")


def llama_order(names: list[str]) -> list[int]:
    """Indices of `names` in llama_model_loader weights_map order (blk.N number, then name)."""
    return list(_llama_order(tuple(names)))


@lru_cache(maxsize=8)
def _llama_order(names: tuple[str, ...]) -> tuple[int, ...]:
    def key(i: int):
        m = _BLK.match(names[i])
        return (int(m.group(1)) if m else -1, names[i].encode())

    return tuple(sorted(range(len(names)), key=key))


def lm_tensor_types(
    tensors: list[tuple[str, tuple[int, ...]]],
    spec: QuantSpec,
    n_layer: int,
    *,
    n_gqa: int,
    has_imatrix: bool = False,
    input_type: Q = Q.F32,
) -> list[Q]:
    """GGML type of each (gguf name, numpy shape), in the given order, as llama-quantize picks it
    for a file whose tensors are all in `input_type` (norms/1-D keep it). `n_gqa` = n_head // n_head_kv;
    `has_imatrix` changes a few choices (e.g. Q4_0's first ffn_down -> Q4_1, IQ3_XXS's attn_v)."""
    names = [n for n, _ in tensors]
    n_attn_v = sum(category(n) == "attn_v" for n in names)
    tied = "output.weight" not in names
    seen = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}  # llama.cpp's i_* counters
    types: list[Q] = [input_type] * len(tensors)

    for idx in llama_order(names):
        name, shape = tensors[idx]
        if not allows_quantization(name, shape):
            continue
        if not spec.quantized:
            types[idx] = spec.default
            continue
        cat, ne0, new = category(name), shape[-1], spec.default
        if cat == "output" or (tied and cat == "token_embd"):
            new = Q.Q8_0 if ne0 % _block(spec.default) else spec.output
        elif cat == "token_embd":
            new = spec.token_embd or spec.default
        else:
            if cat in seen:
                pos = Position(seen[cat], n_attn_v if cat == "attn_v" else n_layer, n_gqa, has_imatrix)
                seen[cat] += 1
            else:
                pos = Position(0, 0, n_gqa, has_imatrix)
            for cond, t in spec.rules.get(cat, ()):
                if cond(pos):
                    new = t
                    break
        types[idx] = fallback(new, ne0)
    return types


def needs_imatrix(name: str, t: Q, spec: QuantSpec) -> bool:
    """tensor_requires_imatrix: llama-quantize refuses to make this tensor without an imatrix."""
    return t in spec.requires_imatrix and name not in (
        "token_embd.weight",
        "per_layer_token_embd.weight",
        "output.weight",
    )


def first_needing_imatrix(
    tensors: list[tuple[str, tuple[int, ...]]], types: list[Q], spec: QuantSpec
) -> tuple[str, Q] | None:
    """The first tensor (llama-quantize's order) that cannot be made without an imatrix, or None."""
    names = [n for n, _ in tensors]
    for idx in llama_order(names):
        name, shape = tensors[idx]
        if allows_quantization(name, shape) and needs_imatrix(name, types[idx], spec):
            return name, types[idx]
    return None


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
