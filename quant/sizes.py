"""Bytes and bits per weight of a quantization mixture for a list of tensors (no weights needed).

What `minicpm-convert --help` and the README list per type for the 8B model, computed from the
published checkpoint's tensor shapes with the same per-tensor rules the converter uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from minicpmv.gguf_info import row_size

from .policy import QuantSpec, first_needing_imatrix, lm_tensor_types


@dataclass(frozen=True)
class MixtureSize:
    name: str
    nbytes: int  # tensor data of the language-model GGUF
    n_params: int
    needs_imatrix: bool  # llama-quantize refuses the type without an importance matrix

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / self.n_params


def mixture_size(
    tensors: list[tuple[str, tuple[int, ...]]], spec: QuantSpec, n_layer: int, n_gqa: int, input_type: Q = Q.F32
) -> MixtureSize:
    """Size of `tensors` quantized with `spec` (with an imatrix only if the type needs one; the
    optional-imatrix types change a few tensors with one). Tensors that stay unquantized keep
    `input_type` (the converter writes norms as F32)."""
    types = lm_tensor_types(tensors, spec, n_layer, n_gqa=n_gqa, input_type=input_type)
    needs = first_needing_imatrix(tensors, types, spec) is not None
    if needs:
        types = lm_tensor_types(tensors, spec, n_layer, n_gqa=n_gqa, has_imatrix=True, input_type=input_type)
    nbytes = n_params = 0
    for (_, shape), t in zip(tensors, types):
        n = math.prod(shape)
        nbytes += n // shape[-1] * row_size(t, shape[-1])
        n_params += n
    return MixtureSize(spec.name, nbytes, n_params, needs)
