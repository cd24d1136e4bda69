"""Synthetic MiniCPM-V 4.5 checkpoints: the real file layout, tensor names, config keys and tokenizer
files, with random weights. Test fixtures (`tiny`, `medium`) and the benchmark model (`full`).

    python -m minicpmv.convert.synthetic --scale tiny OUT_DIR

The published checkpoint's non-weight files (config, index, tokenizer) are the starting point; they
ship inside this package (`reference_files/`). `tiny`/`medium` use a small byte-level BPE vocabulary
trained here with every special token of the real one (same order and flags, ids shifted); `full`
(and `vocab="real"`) copies the real 151,748-token tokenizer unchanged. Shards are assigned as in the
real index. Everything is written tensor by tensor, so `full` (17 GB) needs little memory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from gguf import GGMLQuantizationType, quants

from .config import parse_config
from .layout import expected_shapes

REFERENCE_DIR = Path(__file__).with_name("reference_files")


@dataclass(frozen=True)
class SyntheticSpec:
    """What a scale changes in the published config.json (its language-model keys and its
    `vision_config` keys), and how the tokenizer and the weights are made."""

    text: Mapping[str, int]
    vision: Mapping[str, int]
    vocab: str = "tiny"  # "tiny" (trained here) or "real" (the published tokenizer)
    n_merges: int = 300
    seed: int = 0

    def with_overrides(self, **overrides) -> "SyntheticSpec":
        """Language-model keys by name (hidden_size=128), vision keys as vision_<key>, or fields."""
        text, vision, fields = dict(self.text), dict(self.vision), {}
        for k, v in overrides.items():
            if k in text:
                text[k] = v
            elif k.startswith("vision_") and k[len("vision_") :] in vision:
                vision[k[len("vision_") :]] = v
            elif k in ("vocab", "n_merges", "seed"):
                fields[k] = v
            else:
                raise TypeError(f"unknown synthetic checkpoint setting {k!r}")
        return dataclasses.replace(self, text=text, vision=vision, **fields)


SCALES: dict[str, SyntheticSpec] = {
    # hidden 256 so K-quants (256-blocks) apply; GQA 4:2; vision width 96 (a multiple of 32 but not
    # 256, like 1152) and ffn 200 (not a multiple of 32, like 4304) so the mmproj type rules bite.
    "tiny": SyntheticSpec(
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=512,
        ),
        dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200),
    ),
    # several layers so llama-quantize's use_more_bits() picks some layers and not others.
    "medium": SyntheticSpec(
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=1536,
        ),
        dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200),
    ),
    # the published shapes
    "full": SyntheticSpec(
        dict(
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=12288,
        ),
        dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304),
        vocab="real",
    ),
}

# ----------------------------------------------------------------------------------------------
# tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by Qwen's byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is in the image? Describe the picture in detail. "
    "There is a cat sitting on the table next to a red apple and a blue cup. The mountains are covered "
    "with snow and the sky is clear. Please answer the question about the image and the video. "
    "How many people are there in the photo? Two people are walking along the river at sunset. "
    "这是一张图片。图片中有一只猫和一只狗。请描述这个视频的内容。天空是蓝色的。 "
    "Let me think about this step by step. First, the image shows a landscape; then the answer is yes. "
    "import numpy as np\ndef main():\n    return 42\n"
) * 3
_PRETOK = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def train_bpe(n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A small byte-level BPE (vocab of 256 bytes + merges) trained on a built-in corpus."""
    b2u = bytes_to_unicode()
    words = collections.Counter(tuple(b2u[b] for b in w.encode("utf-8")) for w in _PRETOK.findall(_CORPUS))
    vocab = [b2u[b] for b in range(256)]
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        vocab.append(a + b)
        new_words: collections.Counter = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return vocab, merges


def write_tokenizer(out: Path, spec: SyntheticSpec) -> dict[int, int]:
    """Write the tokenizer files; return the map real special-token id -> id in this vocabulary."""
    ref = REFERENCE_DIR
    if spec.vocab == "real":
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
            shutil.copyfile(ref / f, out / f)
        return {}
    tok_cfg = json.loads((ref / "tokenizer_config.json").read_text(encoding="utf-8"))
    real_added = json.loads((ref / "added_tokens.json").read_text(encoding="utf-8"))
    vocab_list, merges = train_bpe(spec.n_merges)
    # The real vocab.json carries "<unk>" as an ordinary entry (id 128244) that the added-token table
    # re-uses; mirror that: "<unk>" is the last ordinary token here.
    vocab_list.append("<unk>")
    vocab = {t: i for i, t in enumerate(vocab_list)}
    base = len(vocab_list)
    remap = {128244: vocab["<unk>"]}
    for _content, rid in sorted(real_added.items(), key=lambda kv: kv[1]):
        remap[rid] = base + (rid - 151643)
    added = {c: remap[i] for c, i in real_added.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=2), encoding="utf-8")
    tok_cfg["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in tok_cfg["added_tokens_decoder"].items()}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    shutil.copyfile(ref / "special_tokens_map.json", out / "special_tokens_map.json")
    return remap


# ----------------------------------------------------------------------------------------------
# tensors


def _init_kind(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random init: norms near 1, biases small, matrices ~ 1/sqrt(fan_in)."""
    if len(shape) == 1:
        if re.search(r"(norm|layer_norm\d|layernorm|ln_\w+)\.weight$", name):
            return 1.0, 0.1
        return 0.0, 0.02
    if name.endswith("embed_tokens.weight") or name == "resampler.query":
        return 0.0, 1.0
    if name.endswith("position_embedding.weight"):
        return 0.0, 0.5
    fan_in = int(np.prod(shape[1:])) if name != "resampler.proj" else shape[0]
    return 0.0, float(fan_in) ** -0.5


def _shard_plan(names: Iterable[str]) -> list[list[str]]:
    """Group tensors into shards as in the published index (order and shard of each name)."""
    index = json.loads((REFERENCE_DIR / "model.safetensors.index.json").read_text())["weight_map"]
    order = {n: i for i, n in enumerate(index)}
    names = list(names)
    shards: dict[str, list[str]] = collections.defaultdict(list)
    for n in sorted(names, key=lambda n: order.get(n, len(order))):
        shards[index.get(n, "model-00004-of-00004.safetensors")].append(n)
    return [shards[k] for k in sorted(shards)]


def write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...]]], make: Callable[[str, tuple[int, ...]], Iterable[np.ndarray]]
) -> int:
    """Stream a bf16 safetensors file; `make(name, shape)` yields bf16 bit chunks (uint16) in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in entries:
            for chunk in make(name, shape):
                f.write(np.ascontiguousarray(chunk, dtype=np.uint16).tobytes())
    return off


def _config_json(spec: SyntheticSpec, vocab_size: int, remap: dict[int, int]) -> dict:
    cfg = json.loads((REFERENCE_DIR / "config.json").read_text())
    cfg |= dict(spec.text) | {"max_window_layers": spec.text["num_hidden_layers"], "vocab_size": vocab_size}
    for k in ("bos_token_id", "eos_token_id"):
        cfg[k] = remap.get(cfg[k], cfg[k])
    cfg["vision_config"] |= dict(spec.vision)
    return cfg


def make_checkpoint(out: Path | str, scale: str = "tiny", *, progress: bool = False, **overrides) -> Path:
    """Write a synthetic checkpoint folder; `overrides` change the scale's spec (SyntheticSpec.with_overrides)."""
    spec = SCALES[scale].with_overrides(**overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remap = write_tokenizer(out, spec)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    added = json.loads((out / "added_tokens.json").read_text(encoding="utf-8"))
    vocab_size = max(max(vocab.values()), max(added.values())) + 1
    cfg = _config_json(spec, vocab_size, remap)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = json.loads((REFERENCE_DIR / "generation_config.json").read_text())
    for k in ("bos_token_id", "pad_token_id"):
        gen[k] = remap.get(gen[k], gen[k])
    gen["eos_token_id"] = [remap.get(i, i) for i in gen["eos_token_id"]]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shutil.copyfile(REFERENCE_DIR / "preprocessor_config.json", out / "preprocessor_config.json")

    shapes = expected_shapes(parse_config(cfg))
    rng = np.random.default_rng(spec.seed)
    chunk_elems = 1 << 24

    def make(name: str, shape: tuple[int, ...]):
        mean, std = _init_kind(name, shape)
        n = int(np.prod(shape, dtype=np.int64))
        for start in range(0, n, chunk_elems):
            m = min(chunk_elems, n - start)
            x = rng.standard_normal(m, dtype=np.float32)
            x *= std
            x += mean
            yield quants.quantize(x, GGMLQuantizationType.BF16).view(np.uint16)  # round to nearest even

    shards = _shard_plan(shapes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(int(np.prod(s)) * 2 for s in shapes.values()),
            unit="B",
            unit_scale=True,
            desc=f"synthetic {scale}",
        )

    def make_tracked(name, shape):
        for c in make(name, shape):
            if bar is not None:
                bar.update(c.size * 2)
            yield c

    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out / fname, [(n, shapes[n]) for n in names], make_tracked)
        weight_map |= {n: fname for n in names}
    if bar is not None:
        bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m minicpmv.convert.synthetic",
        description="Write a synthetic MiniCPM-V 4.5 checkpoint (real layout, random weights).",
    )
    ap.add_argument("out", type=Path, help="output folder (created)")
    ap.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="tiny",
        help="tiny/medium: test fixtures; full: real shapes, about 17 GB",
    )
    ap.add_argument(
        "--vocab",
        choices=["tiny", "real"],
        default=None,
        help="tokenizer: a small trained BPE or the real 151,748-token one (default per scale)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    over = {"seed": a.seed} | ({"vocab": a.vocab} if a.vocab else {})
    if a.out.exists() and any(a.out.iterdir()):
        print(f"error: {a.out} exists and is not empty", file=sys.stderr)
        return 2
    make_checkpoint(a.out, a.scale, progress=True, **over)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
