"""Per-tensor output type for the language model (llama-quantize's rules)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class QuantSpec:
    name: str                 # canonical, e.g. "Q4_K_M", "F16"
    ftype: LlamaFileType      # general.file_type / llama_ftype
    default: Q                # type of the tensors the mixture does not single out


SPECS = {s.name: s for s in (
    QuantSpec("F32", LlamaFileType.ALL_F32, Q.F32),
    QuantSpec("F16", LlamaFileType.MOSTLY_F16, Q.F16),
    QuantSpec("BF16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    QuantSpec("Q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
)}


def parse_type(name: str) -> QuantSpec:
    try:
        return SPECS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown type {name!r}; valid: {', '.join(SPECS)}") from None


def lm_tensor_types(tensors: list[tuple[str, tuple[int, ...]]], spec: QuantSpec, n_layer: int) -> list[Q]:
    """GGML type of each (gguf name, numpy shape), in order. Norms and 1-D tensors stay F32."""
    types = []
    for name, shape in tensors:
        if len(shape) == 1 or name.endswith("_norm.weight"):
            types.append(Q.F32)
        elif shape[-1] % GGML_QUANT_SIZES[spec.default][0]:
            types.append(Q.F16)
        else:
            types.append(spec.default)
    return types
