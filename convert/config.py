"""MiniCPM-V 4.5 `config.json` as dataclasses (defaults follow the reference `MiniCPMVConfig`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minicpmv.schema import MAX_SLICE_NUMS, PATCH_SIZE, QUERY_NUM, SCALE_RESOLUTION


class CheckpointError(ValueError):
    """Bad input: the message is one line naming the file, tensor or argument at fault."""


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    image_size: int = 980
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    patch_size: int = PATCH_SIZE
    layer_norm_eps: float = 1e-6  # SiglipVisionConfig default (absent from config.json)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class MiniCPMVConfig:
    text: TextConfig
    vision: VisionConfig
    query_num: int = QUERY_NUM
    image_size: int = SCALE_RESOLUTION  # slice size (scale_resolution)
    patch_size: int = PATCH_SIZE
    max_slice_nums: int = MAX_SLICE_NUMS
    use_image_id: bool = True
    drop_vision_last_layer: bool = False
    version: float = 4.5

    @property
    def vision_layers_used(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n


SUPPORTED_MODEL_TYPES = ("minicpmv",)


def load_config(ckpt_dir: Path) -> MiniCPMVConfig:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found (is {ckpt_dir} a MiniCPM-V checkpoint folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))


def parse_config(raw: dict, where: str = "config.json") -> MiniCPMVConfig:
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type is {mt!r}, expected 'minicpmv' (MiniCPM-V 4.5)")
    version = float(raw.get("version", 4.5))
    if version != 4.5:
        raise CheckpointError(f"{where}: version is {version}, only MiniCPM-V 4.5 is supported")

    def need(key: str, d: dict = raw):
        if key not in d:
            raise CheckpointError(f"{where}: missing key {key!r}")
        return d[key]

    n_head = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    text = TextConfig(
        hidden_size=hidden,
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=n_head,
        num_key_value_heads=int(raw.get("num_key_value_heads", n_head)),
        head_dim=int(raw.get("head_dim") or hidden // n_head),
        intermediate_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", 1_000_000)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{where}: rope_scaling {raw['rope_scaling']!r} is not supported")
    vc = dict(need("vision_config"))
    vision = VisionConfig(**{k: vc[k] for k in VisionConfig.__dataclass_fields__ if k in vc})
    slice_cfg = raw.get("slice_config") or {}
    return MiniCPMVConfig(
        text=text,
        vision=vision,
        query_num=int(raw.get("query_num", QUERY_NUM)),
        image_size=int(raw.get("image_size", SCALE_RESOLUTION)),
        patch_size=int(raw.get("patch_size", vision.patch_size)),
        max_slice_nums=int(slice_cfg.get("max_slice_nums", MAX_SLICE_NUMS)),
        use_image_id=bool(raw.get("use_image_id", True)),
        drop_vision_last_layer=bool(raw.get("drop_vision_last_layer", True)),
        version=version,
    )
