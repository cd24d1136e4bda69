"""Shared by the quantization tests: our one-pass conversion vs llama_model_quantize, byte by byte."""

from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from minicpmv import quant
from minicpmv.convert.pipeline import convert

from .llama_quantize import quantize_model_with_llama_cpp

MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def read_tensors(path: Path) -> tuple[dict[str, tuple[Q, bytes]], int]:
    r = GGUFReader(path)
    ftype = int(r.fields["general.file_type"].parts[-1][0])
    return {t.name: (Q(t.tensor_type), t.data.tobytes()) for t in r.tensors}, ftype


def one_pass(ckpt: Path, out: Path, type_name: str, imatrix: Path | None = None) -> Path:
    return convert(
        ckpt, out, quant_type=type_name, imatrix=imatrix, write_mmproj=False, progress=False, threads=2
    ).lm_path


def assert_same_as_llama(
    ckpt: Path, bf16_gguf: Path, tmp: Path, type_name: str, imatrix: Path | None = None
) -> dict[str, Q]:
    """Our one-pass file vs llama_model_quantize(BF16 GGUF): same tensors, types, bytes, file type."""
    ours, ours_ftype = read_tensors(one_pass(ckpt, tmp / "ours", type_name, imatrix))
    ref_path = quantize_model_with_llama_cpp(bf16_gguf, tmp / "ref.gguf", type_name, imatrix=imatrix, nthread=2)
    ref, ref_ftype = read_tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    assert ours_ftype == ref_ftype == int(quant.parse_type(type_name).ftype)
    wrong_type = {n: (ours[n][0].name, ref[n][0].name) for n in ref if ours[n][0] != ref[n][0]}
    assert not wrong_type, f"{type_name}: tensor types differ (ours, llama.cpp): {wrong_type}"
    wrong_data = [n for n in ref if ours[n][1] != ref[n][1]]
    assert not wrong_data, f"{type_name}: tensor bytes differ: {wrong_data}"
    return {n: t for n, (t, _) in ours.items()}


def bf16_gguf(ckpt: Path, out: Path) -> Path:
    return one_pass(ckpt, out, "BF16")


def matmul_widths(gguf_path: Path) -> dict[str, int]:
    """GGUF name -> row length (ne[0]) of every language-model weight llama-imatrix covers."""
    return {
        t.name: int(t.shape[0])
        for t in GGUFReader(gguf_path).tensors
        if t.name.startswith("blk.") and t.name.rsplit(".", 2)[-2] in MATMULS
    }
