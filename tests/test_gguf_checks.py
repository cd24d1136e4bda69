"""The GGUF gate (minicpmv/gguf_info.py, issue 20): every fault the format can have is refused with one
line naming the file and the fault in plain words, before llama.cpp or gguf-py see the file.

Files are written byte by byte here (a small writer of the format, independent of the reader), from
one valid file that gguf-py's GGUFReader also reads, with one fault each.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from minicpmv.gguf_info import GGUFFormatError, ModelFileError, read_gguf_info, size_text
from minicpmv.runtime import MiniCPMV

from .helpers import one_error_line, run_in_process

T = gguf.GGUFValueType
F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, value: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + value


def tensor_info(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return (
        string(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}q", *dims)
        + struct.pack("<IQ", ttype, offset)
    )


def gguf_file(
    path: Path,
    kvs: list[bytes] | None = None,
    infos: list[bytes] | None = None,
    data: bytes | None = None,
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    align: int = 32,
) -> Path:
    """A GGUF file: by default two F32 tensors a [8, 2] and b [4] (96 bytes of data, b at 64)."""
    kvs = (
        [
            kv("general.architecture", T.STRING, string("qwen3")),
            kv("qwen3.block_count", T.UINT32, struct.pack("<I", 2)),
            kv("tokenizer.ggml.tokens", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + string("a") + string("b")),
        ]
        if kvs is None
        else kvs
    )
    infos = [tensor_info("a", [8, 2], F32, 0), tensor_info("b", [4], F32, 64)] if infos is None else infos
    data = bytes(range(80)) if data is None else data
    head = (
        b"GGUF"
        + struct.pack(
            "<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
        )
        + b"".join(kvs)
        + b"".join(infos)
    )
    path.write_bytes(head + b"\0" * (-len(head) % align) + data)
    return path


def fault(path: Path) -> str:
    with pytest.raises(GGUFFormatError) as e:
        read_gguf_info(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and msg.count(str(path)) == 1, msg
    return e.value.reason


def test_the_valid_file_reads_in_both_readers(tmp_path):
    p = gguf_file(tmp_path / "ok.gguf")
    info = read_gguf_info(p)
    r = gguf.GGUFReader(str(p))
    assert info.metadata == {"general.architecture": "qwen3", "qwen3.block_count": 2}
    assert {n: (t.shape, t.offset) for n, t in info.tensors.items()} == {
        t.name: (tuple(int(d) for d in t.shape), t.data_offset) for t in r.tensors
    }


def test_not_a_gguf_file(tmp_path):
    elf = tmp_path / "libfoo.so"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(100))
    assert fault(elf) == "not a GGUF file (starts with 7f 45 4c 46)"
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert fault(empty) == "empty file (0 bytes), not a GGUF file"
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    assert fault(short) == "truncated: the GGUF header needs 24 bytes, the file has 6"
    assert (
        fault(gguf_file(tmp_path / "v1.gguf", version=1)) == "GGUF version 1 is not supported (only versions 2 and 3)"
    )
    assert fault(tmp_path) == "a folder, not a GGUF file"


def test_counts_that_cannot_fit(tmp_path):
    assert fault(gguf_file(tmp_path / "kv.gguf", n_kv=1 << 40)).startswith(
        f"truncated or corrupt: the header announces {1 << 40} key/value pairs and 2 tensors, whose descriptions "
        "need at least"
    )
    assert "the header announces 3 key/value pairs and 100000 tensors" in fault(
        gguf_file(tmp_path / "t.gguf", n_tensors=100_000)
    )


@pytest.mark.parametrize(
    "kvs, reason",
    [
        ([kv("general.architecture", 13, b"")], "key 'general.architecture' has unknown value type 13"),
        ([kv("x", T.ARRAY, struct.pack("<IQ", T.ARRAY, 1))], "key 'x' is an array of arrays (GGUF has none)"),
        ([kv("x", T.ARRAY, struct.pack("<IQ", 99, 1))], "array 'x' has unknown item type 99"),
        (
            [kv("x", T.STRING, struct.pack("<Q", 1 << 40) + b"abc")],
            f"truncated or corrupt: the value of key 'x' claims {size_text(1 << 40)} at offset",
        ),
        (
            [kv("x", T.ARRAY, struct.pack("<IQ", T.UINT32, 1 << 50))],
            f"truncated or corrupt: array 'x' of {1 << 50} uint32 claims",
        ),
        (
            [kv("x", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + string("a") + struct.pack("<Q", 999) + b"b")],
            "truncated or corrupt: string 2 of 2 of array 'x' claims 999 bytes at offset",
        ),
        ([kv("x", T.UINT8, b"\1"), kv("x", T.UINT8, b"\2")], "key 'x' appears twice"),
        # llama.cpp's vocabulary loader aborts the process on a repeated token (an empty one is "[EMPTY_<id>]")
        (
            [
                kv(
                    "tokenizer.ggml.tokens",
                    T.ARRAY,
                    struct.pack("<IQ", T.STRING, 3) + string("a") + string("b") + string("a"),
                )
            ],
            "array 'tokenizer.ggml.tokens': token 2 'a' repeats token 0",
        ),
        (
            [kv("tokenizer.ggml.tokens", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + string("[EMPTY_1]") + string(""))],
            "array 'tokenizer.ggml.tokens': token 1 '[EMPTY_1]' repeats token 0",
        ),
        ([kv("tokenizer.ggml.merges", T.ARRAY, struct.pack("<IQ", T.STRING, 2) + string("a b") + string("a b"))], None),
        ([kv(b"", T.UINT8, b"\1")], "key 1 of 1 is empty"),
        ([kv(b"na\xffme", T.UINT8, b"\1")], "key 1 of 1 is not UTF-8 text (b'na\\xffme')"),
        (
            [kv("general.alignment", T.UINT64, struct.pack("<Q", 32))],
            "key 'general.alignment' must be a uint32, it is a uint64",
        ),
        (
            [kv("general.alignment", T.UINT32, struct.pack("<I", 24))],
            "key 'general.alignment' is 24, not a power of two",
        ),
    ],
)
def test_key_value_faults(tmp_path, kvs, reason):
    if reason is None:  # not a fault
        read_gguf_info(gguf_file(tmp_path / "f.gguf", kvs=kvs))
        return
    assert fault(gguf_file(tmp_path / "f.gguf", kvs=kvs)).startswith(reason)


@pytest.mark.parametrize(
    "infos, reason",
    [
        ([tensor_info("a", [8, 2, 1, 1, 1], F32, 0)], "tensor a has 5 dimensions (ggml allows at most 4)"),
        ([tensor_info("a", [8, -2], F32, 0)], "tensor a: dimension 1 is negative (-2)"),
        ([tensor_info("a", [8, 2], 42, 0)], "tensor a has unknown ggml type 42"),
        ([tensor_info("a", [8, 2], Q8_0, 0)], "tensor a: rows of 8 elements are not a multiple of Q8_0's block of 32"),
        ([tensor_info("a", [1 << 40, 1 << 20], F32, 0)], f"truncated: tensor a needs {size_text(4 << 60)} at offset"),
        (
            [tensor_info("a", [8, 2], F32, 0), tensor_info("b", [4], F32, 32)],
            "tensor b: data offset 32, but a (F32 [8, 2]) ends at 64 "
            "(tensor data follows in order, aligned to 32 bytes)",
        ),
        (
            [tensor_info("a", [8, 200], F32, 0), tensor_info("b", [4], F32, 64)],
            "tensor b: data offset 64, but a (F32 [8, 200]) ends at 6400 (tensor data follows in order",
        ),
        ([tensor_info("a", [8, 2], F32, 32)], "tensor a: data offset 32, but the data starts at 0 (tensor data"),
        ([tensor_info("a", [8, 2], F32, 0), tensor_info("a", [4], F32, 64)], "tensor a appears twice"),
        ([tensor_info("x" * 64, [4], F32, 0)], f"tensor 1 of 1: the name '{'x' * 64}' is longer than ggml's 63 bytes"),
    ],
)
def test_tensor_info_faults(tmp_path, infos, reason):
    assert fault(gguf_file(tmp_path / "f.gguf", infos=infos)).startswith(reason)


def test_truncated_tensor_data_names_the_tensor(tmp_path):
    p = gguf_file(tmp_path / "cut.gguf")
    full = p.read_bytes()
    start = len(full) - 80  # data section: a at start, b at start + 64
    p.write_bytes(full[: start + 70])
    assert fault(p) == f"truncated: tensor b needs 16 bytes at offset {start + 64}, the file ends at {start + 70}"
    p.write_bytes(full[: start - 3])  # inside the padding before the data
    assert fault(p) == f"truncated: tensor a needs 64 bytes at offset {start}, the file ends at {start - 3}"


# --------------------------------------------------------------------------- through the runtime and the CLI


def cli_error(args) -> str:
    res = run_in_process("minicpm-run", *args)
    assert isinstance(res.exception, (SystemExit, type(None)))
    return one_error_line(res, prog="minicpm-run")[len("minicpm-run: error: ") :]


def test_the_issue_cases_through_the_cli(files, tmp_path):
    lm, mm = files
    half = tmp_path / "half-mmproj.gguf"
    half.write_bytes(mm.read_bytes()[: mm.stat().st_size // 2])
    info = read_gguf_info(mm)
    cut = next(t for t in info.tensors.values() if t.offset + t.nbytes > mm.stat().st_size // 2)
    assert cli_error(["--model", lm, "--mmproj", half, "hi"]) == (
        f"{half}: truncated: tensor {cut.name} needs {size_text(cut.nbytes)} at offset {cut.offset}, "
        f"the file ends at {half.stat().st_size}"
    )
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(bytes(range(7, 107)))
    assert cli_error(["--model", noise, "--mmproj", mm, "hi"]) == f"{noise}: not a GGUF file (starts with 07 08 09 0a)"
    folder = tmp_path / "SOME_FOLDER"
    folder.mkdir()
    assert cli_error(["--model", folder, "--mmproj", mm, "hi"]) == f"{folder} is a folder: use --model-dir"
    assert cli_error(["--model", lm, "--mmproj", folder, "hi"]) == f"{folder} is a folder: use --model-dir"


def test_the_api_refuses_before_llama_cpp_and_gguf_py(files, tmp_path):
    lm, mm = files
    cut = tmp_path / "lm.gguf"
    cut.write_bytes(lm.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match=r"lm\.gguf: truncated: tensor output\.weight needs"):
        MiniCPMV.load(cut, mm)
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.mmproj import MmprojError, load_mmproj

    with pytest.raises(GGUFFormatError, match="truncated: tensor output.weight"):
        LlamaModel(cut)  # tests, benchmarks and minicpm-imatrix load through here too
    cut_mm = tmp_path / "mm.gguf"
    cut_mm.write_bytes(mm.read_bytes()[:-10])
    with pytest.raises(MmprojError, match=r"mm\.gguf: truncated: tensor"):
        load_mmproj(cut_mm)
    with pytest.raises(ModelFileError, match="is a folder, not the language model file"):
        MiniCPMV.load(tmp_path, mm)
