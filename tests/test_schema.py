"""minicpmv/schema.py: the one checkpoint <-> GGUF tensor table, checked against the published
checkpoint's own files (its safetensors index and config ship in convert/reference_files/)."""

from __future__ import annotations

import json

from minicpmv import schema
from minicpmv.convert.config import parse_config
from minicpmv.convert.layout import dims, expected_shapes
from minicpmv.convert.synthetic import REFERENCE_DIR


def published():
    cfg = parse_config(json.loads((REFERENCE_DIR / "config.json").read_text(encoding="utf-8")))
    index = json.loads((REFERENCE_DIR / "model.safetensors.index.json").read_text(encoding="utf-8"))
    return cfg, set(index["weight_map"])


def test_table_names_every_tensor_of_the_published_checkpoint():
    cfg, names = published()
    assert set(expected_shapes(cfg)) == names and len(names) == 849


def test_every_gguf_tensor_has_one_source_and_a_unique_name():
    cfg, names = published()
    d = dims(cfg)
    lm = schema.tensors(schema.LM, d, layers=cfg.text.num_hidden_layers, tied=False)
    mm = schema.tensors(schema.MMPROJ, d, layers=cfg.vision_layers_used)
    assert len(lm) == 2 + 36 * 11 + 1 == len({t.gguf for t in lm})
    assert len({t.gguf for t in mm}) == len(mm)
    assert all(t.hf in names for t in lm + mm if not t.computed)
    assert [t.gguf for t in mm if t.computed] == [schema.R_POS_EMBED_K]
    # the packed q|k|v of the resampler: three GGUF tensors from one checkpoint tensor, a third each
    split = [t for t in mm if t.take.startswith("split:") and t.gguf.endswith(".weight")]
    assert [t.gguf for t in split] == [f"{b}.weight" for b in (schema.R_ATTN_Q, schema.R_ATTN_K, schema.R_ATTN_V)]
    assert all(t.hf_shape == (3 * t.shape[0], t.shape[1]) for t in split)
    # tied embeddings drop output.weight and nothing else
    tied = schema.tensors(schema.LM, d, layers=cfg.text.num_hidden_layers, tied=True)
    assert {t.gguf for t in lm} - {t.gguf for t in tied} == {"output.weight"}
