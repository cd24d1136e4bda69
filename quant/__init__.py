"""Quantization: llama.cpp's per-tensor type rules and ggml's own kernels."""

from .encode import encode
from .imatrix import imatrix_metadata, load_imatrix, read_imatrix
from .policy import SPECS, QuantSpec, first_needing_imatrix, lm_tensor_types, parse_type

__all__ = [
    "encode",
    "QuantSpec",
    "SPECS",
    "lm_tensor_types",
    "first_needing_imatrix",
    "parse_type",
    "load_imatrix",
    "read_imatrix",
    "imatrix_metadata",
]
