"""transformers as an oracle: the checkpoint's tokenizer, and its language model as Qwen3ForCausalLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def hf_tokenizer_dir(ckpt: Path, dest: Path) -> Path:
    """A copy of the checkpoint's tokenizer files that transformers can load without remote code
    (docs/pitfalls.md §3: the checkpoint's tokenizer_config points at remote code via auto_map)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer.json"):
        if (ckpt / f).is_file():
            shutil.copyfile(ckpt / f, dest / f)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("auto_map", None)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return dest


def hf_qwen3_of(ckpt: Path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from minicpmv.convert.checkpoint import Checkpoint

    raw = json.loads((ckpt / "config.json").read_text())
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
    )
    cfg = Qwen3Config(**{k: raw[k] for k in keys}, torch_dtype="float32")
    model = Qwen3ForCausalLM(cfg).eval()
    ck = Checkpoint(ckpt)
    sd = {n[len("llm.") :]: torch.from_numpy(ck.f32(n)) for n in ck.names() if n.startswith("llm.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model
