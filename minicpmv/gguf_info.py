"""What a GGUF file is, read fast: metadata scalars and tensor locations, and which of a folder's
files is the language model and which the mmproj.

gguf-py's GGUFReader materialises every metadata array (a 151k-token vocabulary and its merges),
which takes seconds on a language-model file; telling the language model from the mmproj needs only
`general.architecture`, and the runtime only where `token_embd.weight` lives. This walks the header
once, skipping arrays by size, and returns scalars and tensor descriptors. The runtime, the
Modelfile writer and the CLIs all identify files through here.

It is also the gate in front of llama.cpp and gguf-py: every GGUF the runtime opens is read here
first, and every count, length, type and shape is checked against what the format allows and what
the file holds (each tensor's data inside the file), so a malformed file is refused with one line
naming the fault instead of reaching code that aborts the process or fails with a numpy message.

Size: one job over ~400 lines: the header walk and its bounds checks are one pass (each check
sits where its value is read), and the folder helpers are a few lines on top of it.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import gguf
import numpy as np

from .schema import ARCH_KEY, LM_ARCH, MMPROJ_ARCH

GT = gguf.GGUFValueType
_SCALAR = {
    GT.UINT8: "<B",
    GT.INT8: "<b",
    GT.UINT16: "<H",
    GT.INT16: "<h",
    GT.UINT32: "<I",
    GT.INT32: "<i",
    GT.FLOAT32: "<f",
    GT.BOOL: "<?",
    GT.UINT64: "<Q",
    GT.INT64: "<q",
    GT.FLOAT64: "<d",
}
_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR.items()}
VERSIONS = (2, 3)  # GGUF versions with this layout (llama.cpp reads both)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 30  # GGUF_MAX_STRING_LENGTH of llama.cpp's reader
MAX_NAME = 63  # a ggml tensor name holds 63 bytes (GGML_MAX_NAME - 1)
# smallest possible entries (an empty name is refused anyway): key length + 1 byte of key + type +
# a one-byte value; name length + n_dims + type + offset
_MIN_KV, _MIN_TENSOR = 8 + 1 + 4 + 1, 8 + 4 + 4 + 8


class ModelFileError(ValueError):
    """Missing, unreadable or mismatched model files; the message is one line."""


class GGUFFormatError(ModelFileError):
    """Not a GGUF file, or a truncated or corrupt one; `reason` is the message without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def size_text(n: int | None) -> str:
    """Bytes in plain words: 512 bytes, 4.8 kB, 4.8 MB, 4.8 GB ("size unknown" for None)."""
    if n is None:
        return "size unknown"
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if n < scale * 1000 or unit == "TB":
            return f"{n / scale:.1f} {unit}"
    raise AssertionError("unreachable")


def row_size(t: gguf.GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n elements of GGML type t (ggml_row_size)."""
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    if n % block:
        raise ValueError(f"row of {n} elements is not a multiple of {t.name}'s block size {block}")
    return n // block * type_size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne): shape[0] is the row length
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file

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
    metadata: dict[str, object]  # scalar and string values only (arrays are skipped)
    tensors: dict[str, TensorInfo]


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """The header of a GGUF file, checked: GGUFFormatError (one line, naming the fault) unless every
    count, length, type and shape is one the format allows, every tensor's data lies inside the
    file, and a vocabulary has no repeated token. OSError if the file cannot be opened. Loading a
    model asks several times; the answer is kept per file version (path, inode, size, mtime), and
    shared: do not modify it."""
    path = Path(path)
    if path.is_dir():
        raise GGUFFormatError(path, "a folder, not a GGUF file")
    st = path.stat()
    return _read(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read(path: Path, *version: int) -> GGUFInfo:
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # mmap refuses empty files
            raise GGUFFormatError(path, "empty file (0 bytes), not a GGUF file") from None
    with mm:
        return _Header(mm, path).parse()


class _Header:
    """One pass over a GGUF header with every read bounded by the file's size. Lengths and counts
    come from the file, so a value past the end may be corruption as well as truncation."""

    _U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

    def __init__(self, mm: mmap.mmap, path: Path):
        self.mm, self.path, self.pos, self.size = mm, path, 0, len(mm)

    def fail(self, reason: str) -> NoReturn:
        raise GGUFFormatError(self.path, reason)

    def take(self, n: int, what: str, *, claimed: bool = False) -> int:
        """Claim the next n bytes (their offset); `what` names them. `claimed`: n was read from the
        file (a length or a count), so the fault may be corruption as well as truncation."""
        if n > self.size - self.pos:
            if claimed:
                self.fail(
                    f"truncated or corrupt: {what} claims {size_text(n)} at offset {self.pos}, "
                    f"the file ends at {self.size}"
                )
            self.fail(f"truncated: {what} needs {size_text(n)} at offset {self.pos}, the file ends at {self.size}")
        p = self.pos
        self.pos += n
        return p

    def u32(self, what: str) -> int:
        return self._U32.unpack_from(self.mm, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return self._U64.unpack_from(self.mm, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        p = self.take(n, what, claimed=True)
        if n > MAX_STRING:
            self.fail(f"{what} claims {size_text(n)}, more than GGUF allows for a string ({size_text(MAX_STRING)})")
        return self.mm[p : p + n]

    def name(self, what: str) -> str:
        """A key or tensor name: non-empty UTF-8 text (readers look them up by name)."""
        raw = self.string(what)
        if not raw:
            self.fail(f"{what} is empty")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8 text ({raw[:40]!r})")

    def skip_strings(self, count: int, what: str, *, vocabulary: bool = False) -> None:
        """Step over `count` strings (a vocabulary: the hot loop of a language model's header).
        `vocabulary`: no two may be equal; llama.cpp's vocabulary loader asserts that and aborts the
        process otherwise (it names an empty token "[EMPTY_<id>]" first)."""
        mm, pos, end, unpack = self.mm, self.pos, self.size, self._U64.unpack_from
        seen: dict[bytes, int] = {}
        for j in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8, f"the length of string {j + 1} of {count} of {what}")
            n = unpack(mm, pos)[0]
            pos += 8 + n
            if pos > end:
                self.pos = pos - n
                self.take(n, f"string {j + 1} of {count} of {what}", claimed=True)
            if vocabulary:
                word = mm[pos - n : pos] or f"[EMPTY_{j}]".encode()
                if seen.setdefault(word, j) != j:
                    self.fail(f"{what}: token {j} {word.decode('utf-8', 'replace')!r} repeats token {seen[word]}")
        self.pos = pos

    # -- the three parts of a header -------------------------------------------------------------

    def parse(self) -> GGUFInfo:
        n_tensors, n_kv = self.preamble()
        meta, types = self.key_values(n_kv)
        align = self.alignment(meta, types)
        tensors = self.tensor_infos(n_tensors)
        data_start = (self.pos + align - 1) // align * align
        return GGUFInfo(self.path, meta, self.place(tensors, data_start, align))

    def preamble(self) -> tuple[int, int]:
        head = bytes(self.mm[:4])
        if head != b"GGUF":
            if len(head) < 4 and b"GGUF".startswith(head):
                self.fail(f"truncated: the GGUF header needs 24 bytes, the file has {self.size}")
            self.fail(f"not a GGUF file (starts with {head.hex(' ')})")
        if self.size < 24:
            self.fail(f"truncated: the GGUF header needs 24 bytes, the file has {self.size}")
        self.pos = 4
        version = self.u32("the version")
        if version not in VERSIONS:
            self.fail(f"GGUF version {version} is not supported (only versions {' and '.join(map(str, VERSIONS))})")
        n_tensors, n_kv = self.u64("the tensor count"), self.u64("the key/value count")
        least = n_kv * _MIN_KV + n_tensors * _MIN_TENSOR
        if least > self.size - self.pos:
            self.fail(
                f"truncated or corrupt: the header announces {n_kv} key/value pairs and {n_tensors} tensors, "
                f"whose descriptions need at least {size_text(least)}; the file ends at {self.size}"
            )
        return n_tensors, n_kv

    def key_values(self, n_kv: int) -> tuple[dict[str, object], dict[str, int]]:
        """Scalar and string values by key (strings with bad UTF-8 replaced: values are free text);
        arrays are checked and skipped. Also every key's value type."""
        meta: dict[str, object] = {}
        types: dict[str, int] = {}
        for i in range(n_kv):
            key = self.name(f"key {i + 1} of {n_kv}")
            if key in types:
                self.fail(f"key {key!r} appears twice")
            vtype = types[key] = self.u32(f"the value type of key {key!r}")
            if vtype == GT.STRING:
                meta[key] = self.string(f"the value of key {key!r}").decode("utf-8", errors="replace")
            elif vtype in _SCALAR:
                at = self.take(_SIZE[vtype], f"the value of key {key!r}")
                meta[key] = struct.unpack_from(_SCALAR[vtype], self.mm, at)[0]
            elif vtype == GT.ARRAY:
                self.skip_array(key)
            else:
                self.fail(f"key {key!r} has unknown value type {vtype}")
        return meta, types

    def skip_array(self, key: str) -> None:
        itype = self.u32(f"the item type of array {key!r}")
        count = self.u64(f"the length of array {key!r}")
        if itype == GT.STRING:
            if count * 8 > self.size - self.pos:
                self.take(count * 8, f"array {key!r} of {count} strings", claimed=True)
            self.skip_strings(count, f"array {key!r}", vocabulary=key == gguf.Keys.Tokenizer.LIST)
        elif itype in _SIZE:
            self.take(count * _SIZE[itype], f"array {key!r} of {count} {GT(itype).name.lower()}", claimed=True)
        elif itype == GT.ARRAY:
            self.fail(f"key {key!r} is an array of arrays (GGUF has none)")
        else:
            self.fail(f"array {key!r} has unknown item type {itype}")

    def alignment(self, meta: dict[str, object], types: dict[str, int]) -> int:
        key = gguf.Keys.General.ALIGNMENT
        if key not in types:
            return gguf.GGUF_DEFAULT_ALIGNMENT
        if types[key] != GT.UINT32:
            self.fail(f"key {key!r} must be a uint32, it is a {GT(types[key]).name.lower()}")
        align = int(meta[key])
        if align == 0 or align & (align - 1):
            self.fail(f"key {key!r} is {align}, not a power of two")
        return align

    def tensor_infos(self, n_tensors: int) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int, int]]:
        """(name, shape, type, relative offset, bytes) of every tensor, in file order."""
        out, seen = [], set()
        for i in range(n_tensors):
            name = self.name(f"the name of tensor {i + 1} of {n_tensors}")
            if len(name.encode()) > MAX_NAME:
                self.fail(
                    f"tensor {i + 1} of {n_tensors}: the name {name[:70]!r} is longer than ggml's {MAX_NAME} bytes"
                )
            if name in seen:
                self.fail(f"tensor {name} appears twice")
            seen.add(name)
            n_dims = self.u32(f"the dimension count of tensor {name}")
            if n_dims > MAX_DIMS:
                self.fail(f"tensor {name} has {n_dims} dimensions (ggml allows at most {MAX_DIMS})")
            dims = struct.unpack_from(f"<{n_dims}q", self.mm, self.take(8 * n_dims, f"the shape of tensor {name}"))
            for k, d in enumerate(dims):
                if d < 0:
                    self.fail(f"tensor {name}: dimension {k} is negative ({d})")
            raw_type = self.u32(f"the type of tensor {name}")
            offset = self.u64(f"the data offset of tensor {name}")
            try:
                ttype = gguf.GGMLQuantizationType(raw_type)
                block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            except (ValueError, KeyError):
                self.fail(f"tensor {name} has unknown ggml type {raw_type}")
            shape = dims or (1,)
            if shape[0] % block:
                self.fail(
                    f"tensor {name}: rows of {shape[0]} elements are not a multiple of {ttype.name}'s block of {block}"
                )
            nbytes = math.prod(shape) // block * type_size
            out.append((name, tuple(int(d) for d in dims), ttype, offset, nbytes))
        return out

    def place(self, tensors, data_start: int, align: int) -> dict[str, TensorInfo]:
        """Each tensor's data right after the one before it, padded to the alignment (how every GGUF
        writer lays data out, and all llama.cpp's reader accepts), and inside the file. The layout
        first: it pins every size but the last, so a corrupt shape or offset is named as such."""
        end, before = 0, None
        for name, shape, ttype, offset, nbytes in tensors:
            if offset != end:
                was = (
                    f"{before[0]} ({before[1].name} {list(before[2])}) ends at {end}"
                    if before
                    else "the data starts at 0"
                )
                self.fail(
                    f"tensor {name}: data offset {offset}, but {was} (tensor data follows in order, "
                    f"aligned to {align} bytes)"
                )
            end, before = offset + (nbytes + align - 1) // align * align, (name, ttype, shape)
        for name, _, _, offset, nbytes in tensors:
            if data_start + offset + nbytes > self.size:
                self.fail(
                    f"truncated: tensor {name} needs {size_text(nbytes)} at offset {data_start + offset}, "
                    f"the file ends at {self.size}"
                )
        return {name: TensorInfo(name, shape, ttype, data_start + offset) for name, shape, ttype, offset, _ in tensors}


# --------------------------------------------------------------------------- which file is which


def gguf_architecture(path: str | os.PathLike) -> str | None:
    """`general.architecture` of a GGUF file (None if absent); ModelFileError (GGUFFormatError for
    a malformed file) if it cannot be read."""
    try:
        info = read_gguf_info(path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the file ({e.strerror or e})") from None
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
            raise ModelFileError(
                f"{f}: {ARCH_KEY} is {arch!r}; MiniCPM-V 4.5 needs {LM_ARCH!r} "
                f"(language model) or {MMPROJ_ARCH!r} (mmproj)"
            )
        found[arch].append(f)
    for arch, kind in ((LM_ARCH, "language-model"), (MMPROJ_ARCH, "mmproj")):
        if not found[arch]:
            raise ModelFileError(f"{where}: need exactly one {kind} ({arch}) GGUF, found none")
        if len(found[arch]) > 1:
            raise ModelFileError(
                f"{where}: need exactly one {kind} ({arch}) GGUF, found several candidate "
                f"files ({', '.join(f.name for f in found[arch])}); pass the two files explicitly"
            )
    return found[LM_ARCH][0], found[MMPROJ_ARCH][0]


def model_pair(model_path: str | os.PathLike, mmproj_path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (language model, mmproj) to load: the two files, or a folder holding both (mmproj None).
    ModelFileError (one line) for a missing file, a folder where a file belongs, or swapped files."""
    model_path = Path(model_path)
    if mmproj_path is None:
        if not model_path.is_dir():
            raise ModelFileError(f"{model_path}: give a folder holding both GGUF files, or also the mmproj path")
        return find_model_files(model_path)
    mmproj_path = Path(mmproj_path)
    for p, what in ((model_path, "language model"), (mmproj_path, "mmproj")):
        if p.is_dir():
            raise ModelFileError(
                f"{p} is a folder, not the {what} file: give the folder alone to use the two GGUF files in it"
            )
        if not p.is_file():
            raise ModelFileError(f"{p}: {what} file not found")
    if gguf_architecture(mmproj_path) != MMPROJ_ARCH:
        raise ModelFileError(f"{mmproj_path}: not a mmproj file ({ARCH_KEY} is not {MMPROJ_ARCH!r})")
    if gguf_architecture(model_path) == MMPROJ_ARCH:
        raise ModelFileError(f"{model_path}: this is a mmproj file, not the language model")
    return model_path, mmproj_path
