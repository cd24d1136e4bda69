"""minicpm-convert on bad input: one clear line, exit code != 0, nothing written (issue 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minicpmv.convert.checkpoint import read_safetensors_header


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpmv.cli.convert", *args, "--quiet"],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


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


def _drop_tensor(ckpt: Path, name: str, rename_to: str | None = None) -> None:
    """Rewrite the shard holding `name` without it (or under another name), fixing the index."""
    import numpy as np
    from safetensors.numpy import load_file, save_file
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    assert name in read_safetensors_header(shard)
    tensors = {k: v for k, v in load_file(shard).items()}
    t = tensors.pop(name)
    del index["weight_map"][name]
    if rename_to:
        tensors[rename_to] = np.asarray(t)
        index["weight_map"][rename_to] = shard.name
    save_file(tensors, shard)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(ckpt_copy, tmp_path):
    _drop_tensor(ckpt_copy, "llm.model.layers.1.mlp.up_proj.weight")
    res = run_convert(str(ckpt_copy), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "missing tensor", "llm.model.layers.1.mlp.up_proj.weight")
    assert no_outputs(tmp_path / "out")


def test_unknown_tensor(ckpt_copy, tmp_path):
    # keep the expected tensor, add an extra one that MiniCPM-V 4.5 does not have
    from safetensors.numpy import load_file, save_file
    index = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    shard = ckpt_copy / index["weight_map"]["llm.model.norm.weight"]
    tensors = load_file(shard)
    tensors["llm.model.extra_head.weight"] = tensors["llm.model.norm.weight"]
    save_file(tensors, shard)
    index["weight_map"]["llm.model.extra_head.weight"] = shard.name
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
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
