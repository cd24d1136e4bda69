"""Language-model GGUF: llama.cpp loads it and computes transformers' Qwen3 logits (issue 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, Keys, TokenType

from minicpmv.runtime.llama import LlamaModel
from minicpmv.runtime.llama_context import ContextParams, LlamaContext

PROMPT = (
    "<|im_start|>user\nWhat is in the image? Describe the picture in detail, please.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nThe"
)


@pytest.fixture(scope="module")
def prompt_ids(tiny_lm_gguf):
    m = LlamaModel(tiny_lm_gguf("F32"), vocab_only=True)
    ids = m.tokenize(PROMPT)
    m.close()
    assert len(ids) >= 32
    return ids


class Oracle:
    """llama.cpp on the runtime's ctypes layer: logits of every position of a fresh decode."""

    def __init__(self, path: Path, n_ctx: int = 512):
        self.lm = LlamaModel(path, read_file=False)
        self.ctx = LlamaContext(self.lm, ContextParams(n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """[n_tokens, n_vocab]"""
        self.ctx.clear()
        self.ctx.decode_tokens(tokens, 0)
        return self.ctx.all_logits(len(tokens)).copy()

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        out = list(tokens)
        for _ in range(n_new):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(tokens) :]

    def close(self) -> None:
        self.ctx.close()
        self.lm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_f32_logits_match_transformers(tiny_lm_gguf, hf_qwen3, prompt_ids):
    m = Oracle(tiny_lm_gguf("F32"))
    ours = m.logits(prompt_ids)
    ref = hf_logits(hf_qwen3, prompt_ids)
    rng = float(ref.max() - ref.min())
    err = float(np.abs(ours - ref).max()) / rng
    assert err <= 1e-3, f"max abs diff {err:.2e} of the logit range"
    # 20 greedy tokens identical
    ours_gen = m.greedy(prompt_ids, 20)
    ids = list(prompt_ids)
    for _ in range(20):
        ids.append(int(hf_logits(hf_qwen3, ids)[-1].argmax()))
    assert ours_gen == ids[len(prompt_ids) :]
    m.close()


# Measured on the tiny checkpoint, max abs diff relative to the logit range (44-token prompt):
# F32 2.3e-4, F16 3.2e-4, BF16 2.3e-3, Q8_0 1.2e-2 (argmax agreement 100/100/100/95 %).
@pytest.mark.parametrize("outtype,bound", [("F16", 1e-3), ("BF16", 5e-3), ("Q8_0", 2.5e-2)])
def test_lower_precision_stays_close(tiny_lm_gguf, hf_qwen3, prompt_ids, outtype, bound):
    m = Oracle(tiny_lm_gguf(outtype))
    ours = m.logits(prompt_ids)
    m.close()
    ref = hf_logits(hf_qwen3, prompt_ids)
    err = float(np.abs(ours - ref).max()) / float(ref.max() - ref.min())
    assert err <= bound, f"{outtype}: {err:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("outtype,want", [("F32", Q.F32), ("F16", Q.F16), ("BF16", Q.BF16), ("Q8_0", Q.Q8_0)])
def test_tensor_types(tiny_lm_gguf, outtype, want):
    r = GGUFReader(tiny_lm_gguf(outtype))
    for t in r.tensors:
        expect = Q.F32 if len(t.shape) == 1 else want
        assert t.tensor_type == expect, t.name
    names = {t.name for t in r.tensors}
    assert {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
        "blk.1.attn_q_norm.weight",
        "blk.0.ffn_down.weight",
    } <= names


TOKENIZE_CASES = [
    "Hello world! The quick brown fox.",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "中文测试：这是一张图片。",
    "emoji 🙂🚀 and ünïcödé",
    "digits 1234567890 and 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n",
    "<image_id>0</image_id><image><unk><unk></image><slice><unk></slice>\n<slice>x</slice>",
    "<|endoftext|><tool_call><ref>a</ref><box>1</box><|reserved_3|>",
]


@pytest.mark.parametrize("text", TOKENIZE_CASES)
def test_tokenization_matches_hf(tiny_lm_gguf, hf_tokenizer, text):
    m = LlamaModel(tiny_lm_gguf("F32"), vocab_only=True)
    ours = m.tokenize(text)
    m.close()
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TOKENIZE_CASES)
def test_real_vocab_tokenization_matches_hf(real_vocab, text):
    _, gguf_path, tok = real_vocab
    m = LlamaModel(gguf_path, vocab_only=True)
    ours = m.tokenize(text)
    m.close()
    assert ours == tok.encode(text, add_special_tokens=False)


def test_real_vocab_special_ids_and_types(real_vocab):
    _, path, _ = real_vocab
    r = GGUFReader(path)
    f = r.fields

    def val(key):
        return f[key].contents()

    assert val(Keys.Tokenizer.BOS_ID) == 151644  # tokenizer_config bos_token <|im_start|>
    assert val(Keys.Tokenizer.EOS_ID) == 151645  # <|im_end|>
    assert val(Keys.Tokenizer.UNK_ID) == 128244  # <unk> re-uses an in-vocabulary id
    assert val(Keys.Tokenizer.PAD_ID) == 151643
    tokens, types = val(Keys.Tokenizer.LIST), val(Keys.Tokenizer.TOKEN_TYPE)
    assert len(tokens) == 151748
    assert tokens[151669] == "<image>" and types[151669] == TokenType.CONTROL
    assert tokens[151667] == "<think>" and types[151667] == TokenType.USER_DEFINED  # special = false
    assert types[151643] == TokenType.CONTROL and types[128244] == TokenType.CONTROL
    assert types[1000] == TokenType.NORMAL


# Every key llama.cpp's qwen3 loader and vocab reader use, with the GGUF type it asserts.
REQUIRED_KEYS = {
    Keys.General.ARCHITECTURE: GGUFValueType.STRING,
    Keys.General.TYPE: GGUFValueType.STRING,
    Keys.General.FILE_TYPE: GGUFValueType.UINT32,
    Keys.General.QUANTIZATION_VERSION: GGUFValueType.UINT32,
    Keys.General.NAME: GGUFValueType.STRING,
    "qwen3.block_count": GGUFValueType.UINT32,
    "qwen3.context_length": GGUFValueType.UINT32,
    "qwen3.embedding_length": GGUFValueType.UINT32,
    "qwen3.feed_forward_length": GGUFValueType.UINT32,
    "qwen3.attention.head_count": GGUFValueType.UINT32,
    "qwen3.attention.head_count_kv": GGUFValueType.UINT32,
    "qwen3.rope.freq_base": GGUFValueType.FLOAT32,
    "qwen3.attention.layer_norm_rms_epsilon": GGUFValueType.FLOAT32,
    "qwen3.attention.key_length": GGUFValueType.UINT32,
    "qwen3.attention.value_length": GGUFValueType.UINT32,
    Keys.Tokenizer.MODEL: GGUFValueType.STRING,
    Keys.Tokenizer.PRE: GGUFValueType.STRING,
    Keys.Tokenizer.LIST: GGUFValueType.ARRAY,
    Keys.Tokenizer.TOKEN_TYPE: GGUFValueType.ARRAY,
    Keys.Tokenizer.MERGES: GGUFValueType.ARRAY,
    Keys.Tokenizer.BOS_ID: GGUFValueType.UINT32,
    Keys.Tokenizer.EOS_ID: GGUFValueType.UINT32,
    Keys.Tokenizer.ADD_BOS: GGUFValueType.BOOL,
    Keys.Tokenizer.CHAT_TEMPLATE: GGUFValueType.STRING,
}


def test_metadata_keys_and_types(tiny_lm_gguf, tiny_ckpt):
    r = GGUFReader(tiny_lm_gguf("F16"))
    for key, vtype in REQUIRED_KEYS.items():
        assert key in r.fields, key
        assert r.fields[key].types[0] == vtype, key
    f = r.fields
    assert f[Keys.General.ARCHITECTURE].contents() == "qwen3"
    assert f[Keys.Tokenizer.MODEL].contents() == "gpt2"
    assert f[Keys.Tokenizer.PRE].contents() == "qwen2"
    assert f[Keys.Tokenizer.TOKEN_TYPE].types[1] == GGUFValueType.INT32
    assert f[Keys.General.FILE_TYPE].contents() == 1
    assert f[Keys.Tokenizer.ADD_BOS].contents() is False
    tok_cfg = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert f[Keys.Tokenizer.CHAT_TEMPLATE].contents() == tok_cfg["chat_template"]
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert f["qwen3.block_count"].contents() == cfg["num_hidden_layers"]
    assert f["qwen3.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]


def test_data_is_exact_f32(tiny_lm_gguf, tiny_ckpt):
    """F32 output holds the bf16 weights exactly (bf16 -> f32 is lossless), in ggml's layout."""
    from minicpmv.convert.checkpoint import Checkpoint

    ck = Checkpoint(tiny_ckpt)
    r = GGUFReader(tiny_lm_gguf("F32"))
    t = {x.name: x for x in r.tensors}
    np.testing.assert_array_equal(
        np.asarray(t["blk.1.ffn_down.weight"].data), ck.f32("llm.model.layers.1.mlp.down_proj.weight")
    )
    np.testing.assert_array_equal(np.asarray(t["output.weight"].data), ck.f32("llm.lm_head.weight"))


def test_streaming_in_row_blocks_gives_the_same_file(tiny_lm_gguf, tiny_ckpt, tmp_path, monkeypatch):
    """Large tensors are streamed in row blocks (bounded memory); the bytes must not change."""
    from minicpmv.convert import writer
    from minicpmv.convert.pipeline import convert

    monkeypatch.setattr(writer, "BLOCK_ELEMENTS", 3000)  # forces many blocks per matrix
    small = convert(tiny_ckpt, tmp_path, quant_type="Q8_0", write_mmproj=False, progress=False).lm_path
    assert small.read_bytes() == tiny_lm_gguf("Q8_0").read_bytes()


def test_writer_failure_mid_stream_leaves_nothing(tmp_path, monkeypatch):
    """A read error in the middle of a streamed tensor aborts cleanly: no output, no temp file."""
    from gguf import GGMLQuantizationType

    from minicpmv.convert import writer
    from minicpmv.convert.plan import TensorPlan

    monkeypatch.setattr(writer, "BLOCK_ELEMENTS", 64)

    def rows(a, b):
        if a >= 32:
            raise OSError("disk went away")
        return np.ones((b - a, 32), np.float32)

    plans = [
        TensorPlan("a.weight", (8, 32), lambda: np.zeros((8, 32), np.float32)),
        TensorPlan("b.weight", (64, 32), lambda: rows(0, 64), load_rows=rows),
    ]
    for p in plans:
        p.ggml_type = GGMLQuantizationType.F32
    out = tmp_path / "x.gguf"
    with pytest.raises(OSError, match="disk went away"):
        writer.write_gguf(out, "qwen3", lambda w: None, plans, lambda x, p: x.astype(np.float32).view(np.uint8))
    assert list(tmp_path.iterdir()) == []
