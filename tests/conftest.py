"""Shared fixtures: synthetic checkpoints and their GGUF conversions, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from minicpmv.convert.synthetic import make_checkpoint

from .hf_oracles import hf_qwen3_of, hf_tokenizer_dir


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory):
    """Tests never read or write the user's cache folder (e.g. the vision dtype measurement)."""
    old = os.environ.get("MINICPMV_CACHE")
    os.environ["MINICPMV_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop("MINICPMV_CACHE", None)
    else:
        os.environ["MINICPMV_CACHE"] = old


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a skipped test is a failure: a skip there means an install step is missing
    (a tool or package an oracle needs), and a skipped oracle must never pass silently."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes") and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI (an install step is missing?): {reason}"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


def _converted(tmp_path_factory, ckpt: Path, **kw):
    """Factory: type name -> path of a conversion of `ckpt` (made once per session per type)."""
    from minicpmv.convert.pipeline import convert

    lm = "quant_type" in kw
    cache: dict[str, Path] = {}

    def make(type_name: str) -> Path:
        key = type_name.upper() if lm else type_name.lower()
        if key not in cache:
            out = tmp_path_factory.mktemp(("lm-" if lm else "mmproj-") + key)
            res = convert(ckpt, out, progress=False, **{k: key for k in kw}, write_lm=lm, write_mmproj=not lm)
            cache[key] = res.lm_path if lm else res.mmproj_path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_lm_gguf(tmp_path_factory, tiny_ckpt):
    """Factory: language-model type name (F32, F16, BF16, Q8_0, Q4_K_M, ...) -> converted GGUF path."""
    make = _converted(tmp_path_factory, tiny_ckpt, quant_type=None)
    return lambda outtype="F32": make(outtype)


@pytest.fixture(scope="session")
def tiny_mmproj_gguf(tmp_path_factory, tiny_ckpt):
    """Factory: mmproj type name (f32, f16, bf16, q8_0) -> converted mmproj GGUF path."""
    make = _converted(tmp_path_factory, tiny_ckpt, mmproj_type=None)
    return lambda mmproj_type="f32": make(mmproj_type)


@pytest.fixture(scope="session")
def files(tiny_lm_gguf, tiny_mmproj_gguf):
    """(F32 language model, f32 mmproj) of the tiny checkpoint: the pair most tests load."""
    return tiny_lm_gguf("F32"), tiny_mmproj_gguf("f32")


@pytest.fixture(scope="session")
def tiny_real_vocab_ckpt(tmp_path_factory) -> Path:
    """The tiny checkpoint with the published 151,748-token vocabulary: it decodes at a few hundred
    tokens/s and rarely samples an end token, so an answer runs long enough to be stopped (the tiny
    vocabulary's answers end by themselves within ~0.1 s)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-rv") / "tiny", "tiny", vocab="real")


@pytest.fixture(scope="session")
def real_vocab(tmp_path_factory, tiny_real_vocab_ckpt):
    """The published 151,748-token tokenizer on both sides: (checkpoint, its F16 language-model
    GGUF, transformers' tokenizer of the checkpoint)."""
    from transformers import AutoTokenizer

    lm = _converted(tmp_path_factory, tiny_real_vocab_ckpt, quant_type=None)("F16")
    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir(tiny_real_vocab_ckpt, tmp_path_factory.mktemp("rv-tok"))))
    return tiny_real_vocab_ckpt, lm, tok


@pytest.fixture(scope="session")
def tiny_real_vocab_gguf(tmp_path_factory, tiny_real_vocab_ckpt):
    """(Q8_0 language model, f32 mmproj) GGUF paths of tiny_real_vocab_ckpt."""
    lm = _converted(tmp_path_factory, tiny_real_vocab_ckpt, quant_type=None)("Q8_0")
    return lm, _converted(tmp_path_factory, tiny_real_vocab_ckpt, mmproj_type=None)("f32")


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module (use as an autouse alias): the machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory, tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_tokenizer_dir(tiny_ckpt, tmp_path_factory.mktemp("hftok"))))


@pytest.fixture(scope="session")
def hf_qwen3(tiny_ckpt):
    """transformers' Qwen3ForCausalLM with the tiny checkpoint's `llm.*` weights, float32."""
    return hf_qwen3_of(tiny_ckpt)
