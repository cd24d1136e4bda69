"""The checkpoint's tokenizer for transformers (the tokenization oracle)."""

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
