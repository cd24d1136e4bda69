"""What a GGUF file is, read fast: metadata scalars and tensor locations, and which of a folder's
files is the language model and which the mmproj.

gguf-py's GGUFReader materialises every metadata array (a 151k-token vocabulary and its merges),
which takes seconds on a language-model file; telling the language model from the mmproj needs only
`general.architecture`, and the runtime only where `token_embd.weight` lives. This walks the header
once, skipping arrays by size, and returns scalars and tensor descriptors. The runtime, the
Modelfile writer and the CLIs all identify files through here.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .schema import ARCH_KEY, LM_ARCH, MMPROJ_ARCH

GT = gguf.GGUFValueType
_SCALAR = {GT.UINT8: "<B", GT.INT8: "<b", GT.UINT16: "<H", GT.INT16: "<h", GT.UINT32: "<I",
           GT.INT32: "<i", GT.FLOAT32: "<f", GT.BOOL: "<?", GT.UINT64: "<Q", GT.INT64: "<q",
           GT.FLOAT64: "<d"}


class GGUFFormatError(ValueError):
    """Not a GGUF file (or a truncated one); `reason` is the message without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


class ModelFileError(ValueError):
    """Missing, unreadable or mismatched model files; the message is one line."""


def row_size(t: gguf.GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n elements of GGML type t (ggml_row_size)."""
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    if n % block:
        raise ValueError(f"row of {n} elements is not a multiple of {t.name}'s block size {block}")
    return n // block * type_size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]            # ggml order (ne): shape[0] is the row length
    ggml_type: gguf.GGMLQuantizationType
    offset: int                       # absolute byte offset in the file

    @property
    def row_bytes(self) -> int:
        return row_size(self.ggml_type, self.shape[0])

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def n_elements(self) -> int:
        return self.n_rows * self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes


@dataclass
class GGUFInfo:
    path: Path
    metadata: dict[str, object]       # scalar and string values only (arrays are skipped)
    tensors: dict[str, TensorInfo]

    def rows(self, name: str, ids: list[int]) -> np.ndarray:
        """Rows `ids` of a 2-D tensor, dequantized to float32 [len(ids), shape[0]]."""
        t = self.tensors[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_rows, t.row_bytes))
        return gguf.quants.dequantize(np.asarray(data[ids]), t.ggml_type).reshape(len(ids), t.shape[0]) \
            .astype(np.float32, copy=False)


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    path = Path(path)
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise GGUFFormatError(path, "empty file, not GGUF") from None
    with mm:
        try:
            return _parse(mm, path)
        except GGUFFormatError:
            raise
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
            raise GGUFFormatError(path, f"not a valid GGUF file ({e})") from None


def _parse(mm: mmap.mmap, path: Path) -> GGUFInfo:
    if mm[:4] != b"GGUF":
        raise GGUFFormatError(path, "not a GGUF file (bad magic)")
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, pos)
    if version < 2:
        raise GGUFFormatError(path, f"GGUF version {version} is not supported")
    pos += 20

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", mm, p)
        return mm[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

    def skip(vtype: int, p: int) -> int:
        if vtype == GT.STRING:
            (n,) = struct.unpack_from("<Q", mm, p)
            return p + 8 + n
        if vtype == GT.ARRAY:
            itype, count = struct.unpack_from("<IQ", mm, p)
            p += 12
            if itype in _SCALAR:
                return p + count * struct.calcsize(_SCALAR[itype])
            for _ in range(count):
                p = skip(itype, p)
            return p
        return p + struct.calcsize(_SCALAR[vtype])

    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", mm, pos)
        pos += 4
        if vtype == GT.STRING:
            meta[key], pos = string(pos)
        elif vtype in _SCALAR:
            (meta[key],) = struct.unpack_from(_SCALAR[vtype], mm, pos)
            pos += struct.calcsize(_SCALAR[vtype])
        else:
            pos = skip(vtype, pos)

    raw = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", mm, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        raw.append((name, tuple(int(d) for d in dims), ttype, offset))
    align = int(meta.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = (pos + align - 1) // align * align
    tensors = {n: TensorInfo(n, d, gguf.GGMLQuantizationType(t), data_start + o) for n, d, t, o in raw}
    return GGUFInfo(path, meta, tensors)


# --------------------------------------------------------------------------- which file is which

def gguf_architecture(path: str | os.PathLike) -> str | None:
    """`general.architecture` of a GGUF file (None if absent); ModelFileError if it is unreadable."""
    try:
        info = read_gguf_info(path)
    except GGUFFormatError as e:
        raise ModelFileError(f"{path}: not a readable GGUF file ({e.reason})") from None
    except OSError as e:
        raise ModelFileError(f"{path}: not a readable GGUF file ({e.strerror or e})") from None
    arch = info.metadata.get(ARCH_KEY)
    return arch if isinstance(arch, str) else None


def find_model_files(*paths: str | os.PathLike) -> tuple[Path, Path]:
    """(language model, mmproj) among GGUF files and/or folders of `*.gguf` files, told apart by
    `general.architecture` (the mmproj's is `clip`), never by file names. ModelFileError (one line)
    unless exactly one of each is found."""
    where = ", ".join(map(str, paths)) or "(nothing)"
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.glob("*.gguf") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ModelFileError(f"{p}: no such file or folder")
    if not files:
        raise ModelFileError(f"{where}: no .gguf files (no language-model GGUF and no mmproj GGUF)")
    found: dict[str, list[Path]] = {LM_ARCH: [], MMPROJ_ARCH: []}
    for f in files:
        arch = gguf_architecture(f)
        if arch is None:
            raise ModelFileError(f"{f}: GGUF has no {ARCH_KEY}")
        if arch not in found:
            raise ModelFileError(f"{f}: {ARCH_KEY} is {arch!r}; MiniCPM-V 4.5 needs {LM_ARCH!r} "
                                 f"(language model) or {MMPROJ_ARCH!r} (mmproj)")
        found[arch].append(f)
    for arch, kind in ((LM_ARCH, "language-model"), (MMPROJ_ARCH, "mmproj")):
        if not found[arch]:
            raise ModelFileError(f"{where}: need exactly one {kind} ({arch}) GGUF, found none")
        if len(found[arch]) > 1:
            raise ModelFileError(f"{where}: need exactly one {kind} ({arch}) GGUF, found several candidate "
                                 f"files ({', '.join(f.name for f in found[arch])}); pass the two files explicitly")
    return found[LM_ARCH][0], found[MMPROJ_ARCH][0]
