"""Quantization: llama.cpp's per-tensor type rules and ggml's own kernels."""

from .encode import encode
from .policy import QuantSpec, lm_tensor_types, parse_type

__all__ = ["encode", "QuantSpec", "lm_tensor_types", "parse_type"]
