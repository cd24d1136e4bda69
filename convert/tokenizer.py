"""The checkpoint's byte-level BPE tokenizer as llama.cpp GGUF metadata (`gpt2` model, `qwen2` pre).

Reads vocab.json + merges.txt (or tokenizer.json), added_tokens.json and tokenizer_config.json,
without transformers. Token types follow llama.cpp's converter: added tokens that are special (or
look like `<|...|>`) are CONTROL, other added tokens USER_DEFINED, the rest NORMAL, holes UNUSED.
Special ids: the tokenizer_config's `*_token` strings first, then config.json's `*_token_id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import TokenType

from .config import CheckpointError

PRE_TOKENIZER = "qwen2"  # what llama.cpp's hash detection gives every Qwen2/Qwen3 tokenizer
TOKENIZER_MODEL = "gpt2"


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool | None
    chat_template: str | None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tokenizer file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _looks_special(tok: str) -> bool:
    return (
        (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or tok in ("<pad>", "<mask>")
    )


def load_vocab(ckpt_dir: Path, vocab_size: int, config: dict | None = None) -> Vocab:
    d = Path(ckpt_dir)
    tok_json = d / "tokenizer.json"
    tok_cfg = _read_json(d / "tokenizer_config.json")
    added: dict[str, int] = {}
    special_flag: dict[int, bool] = {}
    if tok_json.is_file():
        tj = _read_json(tok_json)
        vocab: dict[str, int] = tj["model"]["vocab"]
        raw_merges = tj["model"].get("merges", [])
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
        for a in tj.get("added_tokens", []):
            added[a["content"]] = a["id"]
            special_flag[a["id"]] = bool(a.get("special"))
    else:
        vocab = _read_json(d / "vocab.json")
        mpath = d / "merges.txt"
        if not mpath.is_file():
            raise CheckpointError(f"{mpath}: tokenizer file not found (need merges.txt or tokenizer.json)")
        lines = mpath.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        if (d / "added_tokens.json").is_file():
            added.update(_read_json(d / "added_tokens.json"))
    for sid, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        added[entry["content"]] = int(sid)
        special_flag[int(sid)] = bool(entry.get("special"))
    if not merges:
        raise CheckpointError(f"{d}: tokenizer has no BPE merges (llama.cpp cannot load a gpt2 vocab without them)")

    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for tok, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = tok, int(TokenType.NORMAL)
    for tok, i in added.items():
        if i >= vocab_size:
            raise CheckpointError(f"{d}: added token {tok!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = tok
        special = special_flag.get(i, False) or _looks_special(tok)
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"

    cfg = config or {}
    special_ids: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        entry = tok_cfg.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in added:
            special_ids[typ] = added[content]
        elif isinstance(cfg.get(f"{typ}_token_id"), int):
            special_ids[typ] = cfg[f"{typ}_token_id"]
    add_bos = tok_cfg.get("add_bos_token")
    template = tok_cfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return Vocab(tokens, types, merges, special_ids, add_bos if isinstance(add_bos, bool) else None, template)  # type: ignore[arg-type]


def add_vocab_metadata(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(TOKENIZER_MODEL)
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    adders = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "unk": w.add_unk_token_id,
        "pad": w.add_pad_token_id,
    }
    for typ, tid in v.special_ids.items():
        adders[typ](tid)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
