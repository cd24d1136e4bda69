"""Shared fixtures: synthetic checkpoints and their GGUF conversions, made once per test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpmv.convert.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_lm_gguf(tmp_path_factory, tiny_ckpt):
    """Factory: language-model type name (F32, F16, BF16, Q8_0, Q4_K_M, ...) -> converted GGUF path."""
    cache: dict[str, Path] = {}

    def make(outtype: str = "F32") -> Path:
        from minicpmv.convert.pipeline import convert
        key = outtype.upper()
        if key not in cache:
            out = tmp_path_factory.mktemp(f"lm-{key}")
            cache[key] = convert(tiny_ckpt, out, quant_type=key, write_mmproj=False, progress=False).lm_path
        return cache[key]
    return make


@pytest.fixture(scope="session")
def tiny_mmproj_gguf(tmp_path_factory, tiny_ckpt):
    """Factory: mmproj type name (f32, f16, bf16, q8_0) -> converted mmproj GGUF path."""
    cache: dict[str, Path] = {}

    def make(mmproj_type: str = "f32") -> Path:
        from minicpmv.convert.pipeline import convert
        key = mmproj_type.lower()
        if key not in cache:
            out = tmp_path_factory.mktemp(f"mmproj-{key}")
            cache[key] = convert(tiny_ckpt, out, mmproj_type=key, write_lm=False, progress=False).mmproj_path
        return cache[key]
    return make


def hf_tokenizer_dir(ckpt: Path, dest: Path) -> Path:
    """A copy of the checkpoint's tokenizer files that transformers can load without remote code
    (pitfalls.md: the checkpoint's tokenizer_config points at remote code via auto_map)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer.json"):
        if (ckpt / f).is_file():
            shutil.copyfile(ckpt / f, dest / f)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("auto_map", None)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory, tiny_ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(hf_tokenizer_dir(tiny_ckpt, tmp_path_factory.mktemp("hftok"))))
