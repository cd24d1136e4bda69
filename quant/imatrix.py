"""llama.cpp importance matrices (llama-imatrix's files): read them into the per-column weights
llama-quantize uses, read and write their raw sums and counts (minicpm-imatrix, appending).

Two formats, told apart like llama.cpp does (a file that is not GGUF is read as legacy):
- GGUF (`general.type = imatrix`): per weight `<name>.in_sum2` (ne = [n_cols, n_mat], sums of x^2) and
  `<name>.counts` (ne = [1, n_mat]); weights = in_sum2 / count per matrix, or 1 where count is 0.
  The keys imatrix.datasets / chunk_count / chunk_size must be present (llama-quantize exits otherwise).
  Written as imatrix.cpp's save_imatrix does: names sorted, F32 tensors, no general.architecture.
- legacy `.dat`: int32 n_entries, then per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval] (already per-chunk means times ncall); weights = values / ncall (as is if ncall <= 0).
llama-imatrix only records `blk.*` matmul weights (output.weight only with --process-output), so those
are the tensors an imatrix must cover; any other tensor without an entry is quantized without one,
as llama-quantize does.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, Keys

from minicpmv.gguf_info import read_gguf_info

from .policy import allows_quantization

_META_KEYS = (Keys.IMatrix.DATASETS, Keys.IMatrix.CHUNK_COUNT, Keys.IMatrix.CHUNK_SIZE)
_GGUF_TYPE = "imatrix"  # general.type of llama-imatrix's files


@dataclass
class Imatrix:
    values: dict[str, np.ndarray]  # name -> float32 per-column weights (n_mat * n_cols)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0


def _magic(path: Path) -> bytes:
    """The first bytes of an importance matrix file (ValueError naming it when it is missing)."""
    if not path.is_file():
        raise ValueError(f"{path}: importance matrix file not found")
    with open(path, "rb") as f:
        return f.read(4)


def read_imatrix(path: Path) -> Imatrix:
    """Every entry of an imatrix file (GGUF or legacy .dat)."""
    path = Path(path)
    im = _read_gguf(path) if _magic(path) == b"GGUF" else _read_legacy(path)
    for name, v in im.values.items():  # llama-quantize refuses any non-finite value
        if not np.isfinite(v).all():
            raise ValueError(f"{path}: importance matrix entry {name} has non-finite values")
    return im


def imatrix_metadata(path: Path) -> dict[str, str | int]:
    """The `quantize.imatrix.*` keys llama-quantize adds to a file quantized with this imatrix
    (string keys STRING, counts UINT32); chunks_count only when known."""
    im = read_imatrix(path)
    meta: dict[str, str | int] = {"quantize.imatrix.file": str(path)[:127]}
    if im.datasets:
        meta["quantize.imatrix.dataset"] = im.datasets[0][:127]
    meta["quantize.imatrix.entries_count"] = len(im.values)
    if im.chunk_count > 0:
        meta["quantize.imatrix.chunks_count"] = im.chunk_count
    return meta


def load_imatrix(
    path: Path, tensor_names: list[str], shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """The imatrix weights of the given GGUF tensors (tensors without an entry are left out).

    Raises ValueError naming the first `blk.*` weight to be quantized that has no entry, or (when
    `shapes` is given) an entry whose size is not the tensor's row length; a token_embd entry of the
    wrong size is dropped, as llama-quantize ignores it."""
    path = Path(path)
    values = read_imatrix(path).values
    missing = [n for n in tensor_names if n not in values and n.startswith("blk.") and allows_quantization(n, (2, 2))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{path}: importance matrix has no entry for tensor {missing[0]}{more}; it was not computed for this model"
        )
    out = {}
    for n in tensor_names:
        v = values.get(n)
        if v is None:
            continue
        if shapes is not None and n in shapes:
            shape = shapes[n]
            want = shape[-1] * (shape[0] if len(shape) == 3 else 1)  # ne[0] * ne[2]
            if v.size != want:
                if n in ("token_embd.weight", "per_layer_token_embd.weight"):
                    continue
                raise ValueError(
                    f"{path}: importance matrix entry {n} has {v.size} values, "
                    f"tensor rows have {want}; it was computed for another model"
                )
        out[n] = v
    return out


@dataclass
class ImatrixSums:
    """The raw content of a GGUF imatrix: per weight the float32 sums of squared inputs
    [n_mat, n_cols] and the float32 counts [n_mat] (whole numbers), plus the imatrix.* keys."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def read_imatrix_sums(path: Path) -> ImatrixSums:
    """Raw sums and counts of a GGUF imatrix (what llama-imatrix --in-file accumulates onto)."""
    path = Path(path)
    if _magic(path) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF importance matrix (a legacy .dat holds no raw sums)")
    read_gguf_info(path)  # a malformed file: one line (GGUFFormatError, a ValueError) before gguf-py sees it
    r = GGUFReader(path)
    if not r.tensors:
        raise ValueError(f"{path}: importance matrix has no data")
    if any(k not in r.fields for k in _META_KEYS):
        raise ValueError(f"{path}: missing imatrix metadata ({', '.join(_META_KEYS)}); not an llama-imatrix GGUF")
    sums, counts = {}, {}
    for t in r.tensors:
        for suffix, d in ((".in_sum2", sums), (".counts", counts), (".in_sum", None)):
            if t.name.endswith(suffix):
                if d is not None:
                    if t.tensor_type != GGMLQuantizationType.F32:
                        raise ValueError(f"{path}: {t.name} must be F32")
                    d[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
                break
    for name in set(sums) | set(counts):
        if name not in sums or name not in counts:
            raise ValueError(f"{path}: mismatched sums and counts for {name}")
        c = counts[name]
        if c.size == 0 or sums[name].size % c.size:
            raise ValueError(f"{path}: {name} has {sums[name].size} sums for {c.size} counts")
        sums[name] = sums[name].reshape(c.size, -1)
    field_ = r.fields[Keys.IMatrix.DATASETS]
    datasets = [str(bytes(field_.parts[i]), "utf-8") for i in field_.data]
    return ImatrixSums(
        sums,
        counts,
        datasets,
        int(r.fields[Keys.IMatrix.CHUNK_COUNT].parts[-1][0]),
        int(r.fields[Keys.IMatrix.CHUNK_SIZE].parts[-1][0]),
    )


def write_imatrix(path: Path, im: ImatrixSums) -> Path:
    """Write `im` as llama-imatrix's GGUF (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = GGUFWriter(tmp, "imatrix")
        w.kv_data[0].pop(Keys.General.ARCHITECTURE)  # imatrix.cpp writes general.type only
        w.add_type(_GGUF_TYPE)
        w.add_array(Keys.IMatrix.DATASETS, list(im.datasets))
        w.add_uint32(Keys.IMatrix.CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.sums):
            s = np.asarray(im.sums[name], np.float32)
            c = np.asarray(im.counts[name], np.float32).reshape(-1)
            if s.size == 0 or c.size == 0:
                continue
            w.add_tensor(f"{name}.in_sum2", s.reshape(c.size, -1))
            w.add_tensor(f"{name}.counts", c.reshape(c.size, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _read_gguf(path: Path) -> Imatrix:
    raw = read_imatrix_sums(path)
    out = {}
    for name in sorted(raw.sums):
        s, c = raw.sums[name], np.round(raw.counts[name])  # llama.cpp: std::lround of each count
        if s.size == 0:
            continue
        # count 0: the tensor never saw input during calibration -> neutral weights of 1
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(c[:, None] > 0, s / c[:, None].astype(np.float32), np.float32(1))
        out[name] = v.astype(np.float32).reshape(-1)
    return Imatrix(out, raw.datasets, raw.chunk_count)


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated legacy importance matrix")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError(f"{path}: no data in importance matrix (neither GGUF nor legacy .dat?)")
    out = {}
    for _ in range(n_entries):
        (n_len,) = take("<i")
        if n_len < 0:
            raise ValueError(f"{path}: corrupt legacy importance matrix")
        name = take(f"<{n_len}s")[0].split(b"\0")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ValueError(f"{path}: bad value count for importance matrix entry {name}")
        v = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        take(f"<{4 * nval}x")
        out[name] = v / np.float32(ncall) if ncall > 0 else v
    # optional trailer: int32 chunk count, int32 length + dataset name
    im = Imatrix(out)
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (n_len,) = take("<i")
            if 0 < n_len <= len(data) - pos:
                im.datasets.append(take(f"<{n_len}s")[0].split(b"\0")[0].decode("utf-8", "replace"))
    return im
