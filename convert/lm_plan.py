"""Language model (`llm.*`, a Qwen3ForCausalLM) -> llama.cpp `qwen3` GGUF: metadata and tensor plans."""

from __future__ import annotations

import gguf

from minicpmv import schema

from .checkpoint import Checkpoint
from .config import MiniCPMVConfig, parse_config
from .layout import dims
from .plan import TensorPlan
from .tokenizer import Vocab, add_vocab_metadata


def lm_plans(ckpt: Checkpoint, cfg: MiniCPMVConfig) -> list[TensorPlan]:
    """One plan per language-model tensor, in llama.cpp order (token_embd, blocks, output_norm, output).

    Types are left F32 here; the quantization policy assigns them (it needs the whole list)."""
    return [
        TensorPlan(
            t.gguf,
            ckpt.shape(t.hf),
            (lambda n=t.hf: ckpt.f32(n)),
            source=t.hf,
            load_rows=(lambda a, b, n=t.hf: ckpt.raw_rows(n, a, b)),
        )
        for t in _lm_tensors(cfg)
    ]


def _lm_tensors(cfg: MiniCPMVConfig) -> list[schema.Tensor]:
    return schema.tensors(schema.LM, dims(cfg), layers=cfg.text.num_hidden_layers, tied=cfg.text.tie_word_embeddings)


def published_lm_layout() -> tuple[MiniCPMVConfig, list[tuple[str, tuple[int, ...]]]]:
    """The published 8B checkpoint's language-model tensors as (GGUF name, numpy shape), in the order
    lm_plans writes them: the schema's table sized by the published config.json (it ships in
    reference_files/). What the size table of --quant is computed from."""
    import json

    from .synthetic import REFERENCE_DIR

    cfg = parse_config(json.loads((REFERENCE_DIR / "config.json").read_text(encoding="utf-8")))
    return cfg, [(t.gguf, t.shape) for t in _lm_tensors(cfg)]


def add_lm_metadata(
    w: gguf.GGUFWriter, cfg: MiniCPMVConfig, vocab: Vocab, *, name: str, file_type: int, n_params: int
) -> None:
    t = cfg.text
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_basename("MiniCPM-V")
    w.add_version("4.5")
    w.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(t.num_hidden_layers)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_rope_freq_base(t.rope_theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    add_vocab_metadata(w, vocab)


def n_params(plans: list[TensorPlan]) -> int:
    return int(sum(p.n_elements for p in plans))
