"""minicpm-convert on bad input: one clear line, exit code != 0, nothing written (issue 2)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmv.convert.checkpoint import read_safetensors_header

from .helpers import one_error_line


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minicpmv.cli.convert", *args, "--quiet"], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    one_error_line(res, *needles, code=None)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def no_outputs(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_missing_folder(tmp_path):
    res = run_convert(str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "nope")
    assert no_outputs(tmp_path / "out")


def test_missing_config(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").unlink()
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "config.json")
    assert no_outputs(tmp_path / "out")


def test_wrong_model_type(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "model_type", "llava")
    assert no_outputs(tmp_path / "out")


def test_truncated_shard(ckpt_copy, tmp_path):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, shard.name, "truncated")
    assert no_outputs(tmp_path / "out")


def _rewrite_shard(ckpt: Path, holder: str, edit) -> None:
    """Rewrite the bf16 shard holding tensor `holder`: `edit(dict name -> uint16 array)` changes it."""
    from minicpmv.convert.checkpoint import Checkpoint
    from minicpmv.convert.synthetic import write_safetensors

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard_name = index["weight_map"][holder]
    ck = Checkpoint(ckpt)
    tensors = {n: ck.raw(n) for n in read_safetensors_header(ckpt / shard_name)}
    ck.close()
    edit(tensors)
    write_safetensors(ckpt / shard_name, [(n, t.shape) for n, t in tensors.items()], lambda n, s: [tensors[n]])
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard_name}
    index["weight_map"] |= {n: shard_name for n in tensors}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(ckpt_copy, tmp_path):
    name = "llm.model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(ckpt_copy, name, lambda t: t.pop(name))
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "missing tensor", name)
    assert no_outputs(tmp_path / "out")


def test_unknown_tensor(ckpt_copy, tmp_path):
    # keep every expected tensor, add one that MiniCPM-V 4.5 does not have
    def add(t):
        t["llm.model.extra_head.weight"] = t["llm.model.norm.weight"]

    _rewrite_shard(ckpt_copy, "llm.model.norm.weight", add)
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "unknown tensor", "llm.model.extra_head.weight")
    assert no_outputs(tmp_path / "out")


def test_bad_quant_name_lists_valid(tiny_ckpt, tmp_path):
    res = run_convert(str(tiny_ckpt), "-o", str(tmp_path / "out"), "--quant", "Q3_XL")
    assert_one_line_error(res, "Q3_XL", "Q4_K_M", "Q8_0")
    assert no_outputs(tmp_path / "out")


def test_existing_output_needs_force(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    first = run_convert(str(tiny_ckpt), "-o", str(out), "--quant", "F16", "--no-mmproj")
    assert first.returncode == 0, first.stderr
    target = out / "MiniCPM-V-4.5-F16.gguf"
    before = target.stat().st_mtime_ns
    res = run_convert(str(tiny_ckpt), "-o", str(out), "--quant", "F16", "--no-mmproj")
    assert_one_line_error(res, str(target), "--force")
    assert target.stat().st_mtime_ns == before
    again = run_convert(str(tiny_ckpt), "-o", str(out), "--quant", "F16", "--no-mmproj", "--force")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["MiniCPM-V-4.5-F16.gguf"]  # no temp files left


def test_output_into_checkpoint_refused(tiny_ckpt):
    res = run_convert(str(tiny_ckpt), "-o", str(tiny_ckpt))
    assert_one_line_error(res, "checkpoint folder")
    assert not list(tiny_ckpt.glob("*.gguf"))


def test_help_is_complete():
    res = subprocess.run([sys.executable, "-m", "minicpmv.cli.convert", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--out", "--quant", "--mmproj-type", "--imatrix", "--ollama", "--force", "--threads"):
        assert opt in res.stdout


def test_one_run_writes_both_files_and_modelfile(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    res = run_convert(str(tiny_ckpt), "-o", str(out), "--quant", "Q8_0", "--ollama")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "MiniCPM-V-4.5-Q8_0.gguf",
        "Modelfile",
        "mmproj-MiniCPM-V-4.5-F16.gguf",
    ]
    text = (out / "Modelfile").read_text()
    assert "FROM ./MiniCPM-V-4.5-Q8_0.gguf" in text and "FROM ./mmproj-MiniCPM-V-4.5-F16.gguf" in text
    # the Modelfile for files that already exist: refused while one exists, rewritten with --force
    again = run_convert("--modelfile-only", str(out))
    assert_one_line_error(again, "Modelfile", "--force")
    (out / "Modelfile").unlink()
    only = run_convert("--modelfile-only", str(out))
    assert only.returncode == 0, only.stderr
    assert (out / "Modelfile").read_text() == text


def _write_header(shard: Path, header) -> None:
    """Replace the shard's JSON header, keeping its data."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda h: [h], ["corrupt safetensors header (not a JSON object)"]),
        (
            lambda h: {
                n: {k: v for k, v in e.items() if k != "data_offsets"} if n != "__metadata__" else e
                for n, e in h.items()
            },
            ["lacks dtype, shape or data_offsets"],
        ),
        (lambda h: {n: e | {"shape": "256"} if n != "__metadata__" else e for n, e in h.items()}, ['has shape "256"']),
        (
            lambda h: {n: e | {"data_offsets": [0, 0]} if n != "__metadata__" else e for n, e in h.items()},
            ["bytes, shape"],
        ),
    ],
)
def test_corrupt_shard_header_entries(ckpt_copy, tmp_path, edit, needles):
    shard = ckpt_copy / "model-00002-of-00003.safetensors"
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    _write_header(shard, edit(header))
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, shard.name, *needles)
    assert no_outputs(tmp_path / "out")


def test_tensors_sharing_bytes(ckpt_copy, tmp_path):
    shard = ckpt_copy / "model-00001-of-00003.safetensors"
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    a, b = [k for k in header if k != "__metadata__"][:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
    _write_header(shard, header)
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, shard.name, "share bytes")
    assert no_outputs(tmp_path / "out")
