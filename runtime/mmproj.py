"""Read a MiniCPM-V 4.5 mmproj GGUF (llama.cpp clip, projector `resampler`) into float32 torch tensors.

Every tensor is dequantized once here (f32/f16/bf16 directly, other ggml types through gguf-py),
so the compute code never sees a ggml type. Two layouts exist for the vision MLP:
- ours: fc1 (hidden -> ffn) is `ffn_up`, fc2 (ffn -> hidden) is `ffn_down`;
- llama.cpp's legacy MiniCPM-V script (`mmproj-model-f16.gguf` from OpenBMB) writes them swapped.
As clip.cpp does, the layout is told from the shapes: if `ffn_down.weight` maps hidden -> ffn
(numpy shape [ffn, hidden], ggml ne[0] == hidden) the file is the legacy swap. Hyper-parameters
come from the clip.* keys, with fallbacks from tensor shapes for keys an older file may lack.
Tensors keep numpy (= torch) shape order, i.e. reversed ggml `ne`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from minicpmv import schema
from minicpmv.gguf_info import GGUFFormatError
from minicpmv.schema import (
    MINICPMV_VERSION,
    PROJECTOR_TYPE,
    R_PROJ,
    R_QUERY,
    RESAMPLER_HEAD_DIM,
    V_PATCH_EMBD,
    V_POS_EMBD,
    ClipKeys,
    v_blk,
)

from .model_file import ModelFile


class MmprojError(ValueError):
    """Bad mmproj input; the message is one line naming the file and key/tensor at fault."""


@dataclass(frozen=True)
class VisionHParams:
    n_embd: int  # vision width (1152)
    n_ff: int  # vision MLP width (4304)
    n_head: int  # vision heads (16)
    n_layer: int  # vision blocks (27)
    patch_size: int  # 14
    image_size: int  # slice size the model was trained for (448)
    eps: float  # LayerNorm epsilon for tower and resampler (1e-6)
    pos_buckets: int  # NaViT position buckets per side (980 / 14 = 70)
    query_num: int  # resampler queries (64)
    embed_dim: int  # resampler / LM width (4096)
    n_head_resampler: int  # embed_dim // 128
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's data is in the file, to read it again later without a memory map."""

    name: str
    offset: int  # absolute byte offset
    nbytes: int
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order


@dataclass
class Mmproj:
    path: Path
    file: ModelFile  # the open file: later reads (streamed weights) go through it
    hparams: VisionHParams
    # our naming (fc1 = ffn_up) -> the file's tensor (dequantized on access) or a float32 tensor
    tensors: dict[str, gguf.ReaderTensor | torch.Tensor]
    legacy_ffn: bool  # the file stored fc1/fc2 under swapped names
    source_types: dict[str, str]  # tensor name (as in the file) -> ggml type name

    def get(self, name: str) -> torch.Tensor:
        """float32 tensor in numpy shape order (a fresh copy for file tensors)."""
        t = self.tensors[name]
        return t if isinstance(t, torch.Tensor) else _dequantize(t)

    def take(self, name: str) -> torch.Tensor:
        """`get`, then forget the tensor: loading holds one dequantized tensor at a time."""
        t = self.get(name)
        del self.tensors[name]
        return t

    def locate(self, name: str) -> TensorLocation:
        """Where `name` (our naming) lives in the file, then forget it (nothing is read)."""
        t = self.tensors.pop(name)
        return TensorLocation(
            name, int(t.data_offset), int(t.n_bytes), t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist()))
        )


def read_tensor(fd: int, loc: TensorLocation) -> torch.Tensor:
    """A tensor read from an open mmproj file with one positioned read: the data passes through the
    page cache into memory of ours, so no mapped page of the file stays in the process. f16 and
    bf16 tensors come back as they are stored (half the bytes of float32; converting them to
    float32 or bf16 later rounds exactly as from the float32 copy), others as float32."""
    buf = np.empty(loc.nbytes, dtype=np.uint8)
    n = os.preadv(fd, [memoryview(buf)], loc.offset)
    if n != loc.nbytes:
        raise MmprojError(f"tensor {loc.name}: read {n} of {loc.nbytes} bytes (file changed or truncated?)")
    if loc.qtype == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(buf.view(np.float16).reshape(loc.shape))
    if loc.qtype == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(buf.view(np.int16).reshape(loc.shape)).view(torch.bfloat16)
    return _decode(buf, loc.qtype, loc.shape, loc.name)


def _dequantize(t: gguf.ReaderTensor) -> torch.Tensor:
    """float32 torch tensor in numpy shape order (owned memory, not the file's memory map)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    raw = np.asarray(t.data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # torch warns about the read-only map; every path copies
        warnings.simplefilter("ignore", UserWarning)
        return _decode(raw, t.tensor_type, shape, t.name)


def _decode(raw: np.ndarray, qt: gguf.GGMLQuantizationType, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """The bytes of one tensor (uint8) -> float32 torch tensor of `shape` (owned memory)."""
    if qt == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(raw.view(np.float32), dtype=np.float32).reshape(shape))
    if qt == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape)).float()
    if qt == gguf.GGMLQuantizationType.BF16:
        bits = raw.view(np.int16).reshape(shape)
        return torch.from_numpy(bits).view(torch.bfloat16).float()
    try:
        arr = gguf.quants.dequantize(raw, qt)
    except NotImplementedError:
        raise MmprojError(f"tensor {name}: ggml type {qt.name} cannot be dequantized") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))


def _field(reader: gguf.GGUFReader, key: str, path: Path):
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except UnicodeDecodeError:
        raise MmprojError(f"{path}: the value of {key} is not UTF-8 text") from None


def _need(shapes: dict[str, tuple[int, ...]], path: Path, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise MmprojError(f"{path}: tensor {name} is missing (not a MiniCPM-V 4.5 mmproj?)")
    return shapes[name]


def read_hparams(reader: gguf.GGUFReader, shapes: dict[str, tuple[int, ...]], path: Path) -> VisionHParams:
    ptype = _field(reader, ClipKeys.PROJECTOR_TYPE, path)
    if ptype is not None and ptype != PROJECTOR_TYPE:
        raise MmprojError(f"{path}: {ClipKeys.PROJECTOR_TYPE} is {ptype!r}, expected {PROJECTOR_TYPE!r} (MiniCPM-V)")
    version = _field(reader, ClipKeys.MINICPMV_VERSION, path)
    if version is not None and int(version) != MINICPMV_VERSION:
        raise MmprojError(
            f"{path}: {ClipKeys.MINICPMV_VERSION} is {version}, only {MINICPMV_VERSION} (MiniCPM-V 4.5) is supported"
        )

    patch = _need(shapes, path, V_PATCH_EMBD + ".weight")  # [n_embd, 3, p, p]
    pos = _need(shapes, path, V_POS_EMBD + ".weight")  # [buckets^2, n_embd]
    proj = _need(shapes, path, R_PROJ + ".weight")  # [embed_dim, embed_dim]
    query = _need(shapes, path, R_QUERY)  # [query_num, embed_dim]
    up = _need(shapes, path, v_blk("ffn_up", 0) + ".weight")

    def get(key: str, default):
        v = _field(reader, key, path)
        return default if v is None else v

    n_embd = int(get(ClipKeys.EMBEDDING_LENGTH, patch[0]))
    n_blocks = sum(1 for n in shapes if n.endswith(".attn_q.weight") and n.startswith("v.blk."))
    n_layer = int(get(ClipKeys.BLOCK_COUNT, n_blocks))
    if not 0 < n_layer <= n_blocks:
        raise MmprojError(f"{path}: {ClipKeys.BLOCK_COUNT}={n_layer} but the file holds {n_blocks} vision blocks")
    n_head = _field(reader, ClipKeys.HEAD_COUNT, path)
    if n_head is None:
        if n_embd % 72:
            raise MmprojError(f"{path}: {ClipKeys.HEAD_COUNT} is missing and cannot be inferred")
        n_head = n_embd // 72  # SigLIP head_dim
    buckets = _field(reader, ClipKeys.POS_BUCKETS, path)
    if buckets is None:
        buckets = math.isqrt(pos[0])
        if buckets * buckets != pos[0]:
            raise MmprojError(f"{path}: {V_POS_EMBD}.weight has {pos[0]} rows, not a square grid")
    embed_dim = proj[0]
    if embed_dim % RESAMPLER_HEAD_DIM:
        raise MmprojError(f"{path}: {R_PROJ}.weight width {embed_dim} is not a multiple of {RESAMPLER_HEAD_DIM}")
    mean = tuple(float(x) for x in get(ClipKeys.IMAGE_MEAN, schema.IMAGE_MEAN))
    std = tuple(float(x) for x in get(ClipKeys.IMAGE_STD, schema.IMAGE_STD))
    hp = VisionHParams(
        n_embd=n_embd,
        n_ff=int(get(ClipKeys.FEED_FORWARD_LENGTH, max(up))),
        n_head=int(n_head),
        n_layer=n_layer,
        patch_size=int(get(ClipKeys.PATCH_SIZE, patch[-1])),
        image_size=int(get(ClipKeys.IMAGE_SIZE, schema.SCALE_RESOLUTION)),
        eps=float(get(ClipKeys.LAYERNORM_EPS, 1e-6)),
        pos_buckets=int(buckets),
        query_num=int(get(ClipKeys.MINICPMV_QUERY_NUM, 0) or query[0]),
        embed_dim=embed_dim,
        n_head_resampler=embed_dim // RESAMPLER_HEAD_DIM,
        image_mean=mean[:3],
        image_std=std[:3],
    )
    if hp.n_embd != patch[0] or hp.n_head < 1 or hp.n_embd % hp.n_head:
        raise MmprojError(
            f"{path}: {ClipKeys.EMBEDDING_LENGTH}={hp.n_embd} does not fit "
            f"{V_PATCH_EMBD}.weight {patch} / {hp.n_head} heads"
        )
    if hp.query_num != query[0]:
        raise MmprojError(f"{path}: {ClipKeys.MINICPMV_QUERY_NUM}={hp.query_num} but {R_QUERY} has {query[0]} rows")
    check_free_values(hp, path)
    return hp


def check_free_values(hp: VisionHParams, path: Path) -> None:
    """The hyper-parameters no tensor shape pins down must still make sense: a slice size the
    position table covers (a corrupt one would make the slicer ask for gigapixel slices), a positive
    epsilon, and pixel statistics that normalize (a zero std divides by zero)."""
    p = hp.patch_size
    if p < 1 or hp.image_size % p or not p <= hp.image_size <= hp.pos_buckets * p:
        raise MmprojError(
            f"{path}: {ClipKeys.IMAGE_SIZE}={hp.image_size} is not a multiple of the patch size {p} "
            f"between {p} and {hp.pos_buckets * p} (what the position table covers)"
        )
    if not 0 < hp.eps < 1:
        raise MmprojError(f"{path}: {ClipKeys.LAYERNORM_EPS}={hp.eps} is not a small positive number")
    stats = hp.image_mean + hp.image_std
    if len(stats) != 6 or not all(math.isfinite(x) for x in stats) or min(hp.image_std) <= 0:
        raise MmprojError(
            f"{path}: {ClipKeys.IMAGE_MEAN}/{ClipKeys.IMAGE_STD} must be three finite numbers each, "
            f"the std positive (they are {list(hp.image_mean)} / {list(hp.image_std)})"
        )


def is_legacy_ffn(shapes: dict[str, tuple[int, ...]], n_embd: int, has_general_type: bool) -> bool:
    """True when fc1 is stored as ffn_down (llama.cpp's legacy MiniCPM-V converter)."""
    down = shapes.get(v_blk("ffn_down", 0) + ".weight")
    if down is None:
        return False
    # numpy shape [out, in]: fc1 is [ffn, hidden] (ggml ne[0] == hidden).
    if down[1] == n_embd and down[0] != n_embd:
        return True
    if down[0] == n_embd and down[1] != n_embd:
        return False
    return not has_general_type  # square MLP: only our files carry general.type


def expected_tensors(hp: VisionHParams) -> list[schema.Tensor]:
    """The mmproj tensors the vision path reads, with the shapes `hp` implies (the schema's table;
    `resampler.pos_embed_k` is left out: the runtime recomputes the sin-cos table)."""
    dims = {
        "Hv": hp.n_embd,
        "Iv": hp.n_ff,
        "H": hp.embed_dim,
        "P": hp.patch_size,
        "Np": hp.pos_buckets**2,
        "Q": hp.query_num,
    }
    return [t for t in schema.tensors(schema.MMPROJ, dims, layers=hp.n_layer) if not t.computed]


def load_mmproj(path: str | Path) -> Mmproj:
    """Open the file (once, model_file.py), read the hyper-parameters and find every tensor the
    vision path uses (dequantized later, one at a time, by `Mmproj.get` / `Mmproj.take`)."""
    path = Path(path)
    if not path.is_file():
        raise MmprojError(f"{path}: mmproj file not found")
    file = ModelFile(path)
    try:
        file.info  # noqa: B018 (checked before gguf-py sees a malformed file)
    except GGUFFormatError as e:
        file.close()
        raise MmprojError(str(e)) from None
    reader = gguf.GGUFReader(file.open_path, "r")
    by_name = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in by_name.items()}
    try:
        hp = read_hparams(reader, shapes, path)
    except (TypeError, ValueError) as e:
        if isinstance(e, MmprojError):
            raise
        raise MmprojError(f"{path}: a clip.* hyper-parameter has the wrong type ({e})") from None
    legacy = is_legacy_ffn(shapes, hp.n_embd, reader.get_field(gguf.Keys.General.TYPE) is not None)

    def file_name(name: str) -> str:
        if legacy and ".ffn_" in name:
            return name.replace(".ffn_up", ".ffn_tmp").replace(".ffn_down", ".ffn_up").replace(".ffn_tmp", ".ffn_down")
        return name

    tensors: dict[str, gguf.ReaderTensor | torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in expected_tensors(hp):
        src = file_name(t.gguf)
        if src not in by_name:
            raise MmprojError(f"{path}: tensor {src} is missing")
        if shapes[src] != t.shape:
            raise MmprojError(f"{path}: tensor {t.gguf} has shape {shapes[src]}, expected {t.shape}")
        tensors[t.gguf] = by_name[src]
        types[src] = by_name[src].tensor_type.name
    # the reader's memory map stays open while any ReaderTensor is referenced
    return Mmproj(path=path, file=file, hparams=hp, tensors=tensors, legacy_ffn=legacy, source_types=types)
