"""Lazy reader for sharded safetensors checkpoints.

Each shard's JSON header is parsed once; tensor data stays on disk until a tensor (or a block of its
rows) is asked for, so reading a 17 GB bf16 checkpoint needs memory for one block at a time. bf16 is widened
to float32 by gguf-py's BF16 dequantizer (exact: bf16 is the top half of an f32), without torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

from .config import CheckpointError

# safetensors dtype -> (numpy dtype to view the bytes as, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BF16": (np.dtype("<u2"), 2),
    "F16": (np.dtype("<f2"), 2),
    "F32": (np.dtype("<f4"), 4),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8 or hlen > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {hlen}, file {size} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + hlen
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _entry(path, name, info)
        expect = math.prod(shape) * _DTYPES[dtype][1]
        if end - start != expect:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes, shape {shape} needs {expect}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated shard: tensor {name} ends at byte {base + end}, file has {size} bytes"
            )
        refs[name] = TensorRef(name, path, dtype, shape, base + start, end - start)
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs.values())
    for (_, a_end, a), (b_start, b_end, b) in zip(spans, spans[1:]):
        if b_start < a_end and b_end > b_start:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a} and {b} share bytes")
    return refs


def _entry(path: Path, name: str, info) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data_offsets) of one header entry, each of the form safetensors writes."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name!r} lacks dtype, shape or "
            f"data_offsets ({json.dumps(info)[:120]})"
        ) from None
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")

    def counts(v) -> bool:
        return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)

    if not counts(shape) or not counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name!r} has shape {json.dumps(shape)} "
            f"and data_offsets {json.dumps(offsets)}"
        )
    return dtype, tuple(shape), (offsets[0], offsets[1])


def read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name in the same folder)."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (not JSON: {e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f'{index}: not a safetensors index (no "weight_map" object)') from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f'{index}: not a safetensors index ("weight_map" is not an object)')
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(
                f"{index}: tensor {name!r} is mapped to {shard!r}, not a shard file name in the checkpoint folder"
            )
    return weight_map


class Checkpoint:
    """All tensors of a checkpoint folder, by name, read lazily."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: checkpoint folder not found")
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_index(index)
            shard_names = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map, shard_names = {}, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX_FILE} or {SINGLE_FILE} found")
        self.tensors: dict[str, TensorRef] = {}
        for shard in shard_names:
            p = self.dir / shard
            if not p.is_file():
                raise CheckpointError(f"{p}: shard listed in {INDEX_FILE} is missing")
            self.tensors.update(read_safetensors_header(p))
        for name, shard in weight_map.items():
            ref = self.tensors.get(name)
            if ref is None or ref.file.name != shard:
                raise CheckpointError(f"{self.dir / shard}: tensor {name} listed in {INDEX_FILE} is not in that shard")
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name} not found in checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ref(name).shape

    def _read(self, ref: TensorRef, start_row: int = 0, stop_row: int | None = None) -> np.ndarray:
        """Rows [start_row, stop_row) of the tensor (viewed as [rows, last dim]) as stored.

        Plain positioned reads, not a memory map: mapped pages would count in the process's
        resident memory and grow with the checkpoint; page-cache reads do not."""
        view_dtype, size = _DTYPES[ref.dtype]
        row_len = ref.shape[-1] if ref.shape else 1
        n_rows = ref.n_elements // row_len if row_len else 0
        stop_row = n_rows if stop_row is None else stop_row
        n = (stop_row - start_row) * row_len
        out = np.empty(n, dtype=view_dtype)
        fd = self._fds.get(ref.file)
        if fd is None:
            fd = self._fds[ref.file] = os.open(ref.file, os.O_RDONLY)
        buf = memoryview(out).cast("B")
        off, got = ref.offset + start_row * row_len * size, 0
        while got < len(buf):
            k = os.preadv(fd, [buf[got:]], off + got)
            if k <= 0:
                raise CheckpointError(f"{ref.file}: truncated shard while reading tensor {ref.name}")
            got += k
        return out

    def raw(self, name: str) -> np.ndarray:
        """The stored data (bf16 appears as uint16), shaped as the tensor."""
        ref = self.ref(name)
        return self._read(ref).reshape(ref.shape)

    def f32(self, name: str) -> np.ndarray:
        """A tensor as a fresh float32 array (one tensor in memory, not the shard)."""
        ref = self.ref(name)
        return self._to_f32(ref, self._read(ref)).reshape(ref.shape)

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (bf16 as uint16 bit patterns): the quantizer widens them
        chunk by chunk on its worker threads, so the reading thread only does I/O."""
        ref = self.ref(name)
        return self._read(ref, start, stop).reshape(stop - start, ref.shape[-1])

    def f32_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor viewed as [rows, last dim], as float32."""
        ref = self.ref(name)
        return self._to_f32(ref, self._read(ref, start, stop)).reshape(stop - start, ref.shape[-1])

    @staticmethod
    def _to_f32(ref: TensorRef, raw: np.ndarray) -> np.ndarray:
        if ref.dtype == "BF16":
            return quants.dequantize(raw.view(np.uint8), GGMLQuantizationType.BF16)
        return raw.astype(np.float32, copy=False)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):  # absent when __init__ raised
            self.close()
