"""The tensors a MiniCPM-V 4.5 checkpoint holds, with their shapes from its config (the schema's
table, sized by config.json), and the converter's input validation."""

from __future__ import annotations

from minicpmv import schema

from .checkpoint import Checkpoint
from .config import CheckpointError, MiniCPMVConfig


def dims(cfg: MiniCPMVConfig) -> dict[str, int]:
    """The schema's dimension names (see minicpmv.schema) sized by config.json."""
    t, v = cfg.text, cfg.vision
    return {
        "H": t.hidden_size,
        "V": t.vocab_size,
        "I": t.intermediate_size,
        "hd": t.head_dim,
        "Hq": t.num_attention_heads * t.head_dim,
        "Hkv": t.num_key_value_heads * t.head_dim,
        "Hv": v.hidden_size,
        "Iv": v.intermediate_size,
        "P": v.patch_size,
        "Np": v.num_patches_per_side**2,
        "Q": cfg.query_num,
    }


def expected_shapes(cfg: MiniCPMVConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor (all vision layers: the checkpoint holds them all)."""
    return schema.checkpoint_shapes(
        dims(cfg),
        text_layers=cfg.text.num_hidden_layers,
        vision_layers=cfg.vision.num_hidden_layers,
        tied=cfg.text.tie_word_embeddings,
    )


def validate(ckpt: Checkpoint, cfg: MiniCPMVConfig, prefixes: tuple[str, ...] = ("llm.", "vpm.", "resampler.")) -> None:
    """Every expected tensor present with the config's shape; no unknown tensor. One-line errors."""
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        if not name.startswith(prefixes):
            continue
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.dir}: missing tensor {name} (config.json expects shape {shape})")
        ref = ckpt.ref(name)
        if ref.shape != shape:
            raise CheckpointError(f"{ref.file}: tensor {name} has shape {ref.shape}, config.json expects {shape}")
    for name in ckpt.names():
        if name not in shapes:
            raise CheckpointError(f"{ckpt.ref(name).file}: unknown tensor {name} (not part of MiniCPM-V 4.5)")
