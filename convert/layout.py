"""The tensors a MiniCPM-V 4.5 checkpoint holds, with their HF shapes, derived from its config.

One source for the synthetic checkpoint writer and for the converter's input validation.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .config import CheckpointError, MiniCPMVConfig


def expected_shapes(cfg: MiniCPMVConfig) -> dict[str, tuple[int, ...]]:
    t, v = cfg.text, cfg.vision
    H, V, I = t.hidden_size, t.vocab_size, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    s: dict[str, tuple[int, ...]] = {"llm.model.embed_tokens.weight": (V, H)}
    for i in range(t.num_hidden_layers):
        p = f"llm.model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
              p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
              p + "self_attn.q_norm.weight": (t.head_dim,), p + "self_attn.k_norm.weight": (t.head_dim,),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
              p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    s |= {"llm.model.norm.weight": (H,)}
    if not t.tie_word_embeddings:
        s |= {"llm.lm_head.weight": (V, H)}
    Hv, Iv, P = v.hidden_size, v.intermediate_size, v.patch_size
    s |= {"vpm.embeddings.patch_embedding.weight": (Hv, 3, P, P), "vpm.embeddings.patch_embedding.bias": (Hv,),
          "vpm.embeddings.position_embedding.weight": (v.num_patches_per_side ** 2, Hv)}
    for i in range(v.num_hidden_layers):
        p = f"vpm.encoder.layers.{i}."
        for k in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s |= {p + f"self_attn.{k}.weight": (Hv, Hv), p + f"self_attn.{k}.bias": (Hv,)}
        s |= {p + "layer_norm1.weight": (Hv,), p + "layer_norm1.bias": (Hv,),
              p + "mlp.fc1.weight": (Iv, Hv), p + "mlp.fc1.bias": (Iv,),
              p + "mlp.fc2.weight": (Hv, Iv), p + "mlp.fc2.bias": (Hv,),
              p + "layer_norm2.weight": (Hv,), p + "layer_norm2.bias": (Hv,)}
    s |= {"vpm.post_layernorm.weight": (Hv,), "vpm.post_layernorm.bias": (Hv,)}
    s |= {"resampler.query": (cfg.query_num, H), "resampler.kv_proj.weight": (H, Hv),
          "resampler.attn.in_proj_weight": (3 * H, H), "resampler.attn.in_proj_bias": (3 * H,),
          "resampler.attn.out_proj.weight": (H, H), "resampler.attn.out_proj.bias": (H,),
          "resampler.ln_q.weight": (H,), "resampler.ln_q.bias": (H,),
          "resampler.ln_kv.weight": (H,), "resampler.ln_kv.bias": (H,),
          "resampler.ln_post.weight": (H,), "resampler.ln_post.bias": (H,),
          "resampler.proj": (H, H)}
    return s


def validate(ckpt: Checkpoint, cfg: MiniCPMVConfig, prefixes: tuple[str, ...] = ("llm.", "vpm.", "resampler.")) -> None:
    """Every expected tensor present with the config's shape; no unknown tensor. One-line errors."""
    want = {n: s for n, s in expected_shapes(cfg).items() if n.startswith(prefixes)}
    for name, shape in want.items():
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.dir}: missing tensor {name} (config.json expects shape {shape})")
        ref = ckpt.ref(name)
        if ref.shape != shape:
            raise CheckpointError(f"{ref.file}: tensor {name} has shape {ref.shape}, config.json expects {shape}")
    known = set(expected_shapes(cfg))
    for name in ckpt.names():
        if name not in known:
            raise CheckpointError(f"{ckpt.ref(name).file}: unknown tensor {name} (not part of MiniCPM-V 4.5)")
