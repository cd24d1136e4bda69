"""minicpm-imatrix (issue 15): an importance matrix computed by running the model on a calibration set.

Oracles:
- text: the matrix equals an independent computation, transformers' Qwen3 on the same float32
  weights with forward pre-hooks summing the squared inputs of every nn.Linear of the layers, over
  the same tokens (with llama-imatrix's rule that a batch of fewer than 16 positions is ignored);
- format: llama-quantize's reader (common_imatrix_load re-enacted on ggml's own GGUF parser) reads
  the file, and gives the same weights as our --imatrix path;
- images: the image positions change the matrix, by exactly the positions they add to the counts;
- a quantization with the image matrix is byte-identical between our one-pass path and
  llama_model_quantize;
- appending: a run resumed after an interruption equals one uninterrupted run; counts add up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.cli.calibration import DEFAULT_QUESTION, read_calibration
from minicpmv.cli.imatrix_compute import ImatrixJob, compute_imatrix
from minicpmv.quant.imatrix import read_imatrix, read_imatrix_sums

from . import helpers
from .imatrix_c_reader import load_like_llama_quantize
from .quant_helpers import MATMULS, assert_same_as_llama

N_CTX = 256
# Measured on the tiny checkpoint (f32 weights, f32 KV cache, no flash attention): per-column sums
# agree with transformers to 1.0e-6 relative; the bound leaves room for thread-order rounding.
RTOL = 1e-4
HF_LINEAR = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LINES = [
    "The quick brown fox jumps over the lazy dog. What is in the image? Describe the picture in detail.",
    "There is a cat sitting on the table next to a red apple and a blue cup. " * 16,  # > N_CTX tokens
    "short line",  # < 16 tokens
    "How many people are there in the photo? Two people are walking along the river at sunset.",
    json.dumps({"text": "Please answer the question about the image and the video, step by step."}),
]
QUESTIONS = ["What is in the image?", "Describe the picture in detail.", "How many shapes are there?"]


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    pass


def run(files, cal: Path, out: Path, **kw):
    lm, mm = files
    job = ImatrixJob(lm, mm, cal, out, n_ctx=N_CTX, threads=2, kv_type="f32", flash_attn=False, progress=False, **kw)
    return compute_imatrix(job)


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x * 255 / 320, y * 255 / 240, (x * y) % 255], -1)
    Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def text_cal(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cal") / "text.jsonl", LINES)


@pytest.fixture(scope="module")
def text_matrix(files, text_cal, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("im") / "text.gguf"
    res = run(files, text_cal, out)
    assert (res.first, res.done, res.chunk_count) == (0, len(LINES), len(LINES))
    return out


@pytest.fixture(scope="module")
def image_cals(tmp_path_factory) -> tuple[Path, Path]:
    """The same questions without and with a (320x240, one 64-row slot) image."""
    d = tmp_path_factory.mktemp("cal-img")
    imgs = [picture(d / f"p{i}.png", i) for i in range(len(QUESTIONS))]
    chat = write_jsonl(d / "chat.jsonl", [{"text": q} for q in QUESTIONS])
    with_img = write_jsonl(d / "images.jsonl", [{"image": p.name, "text": q} for p, q in zip(imgs, QUESTIONS)])
    return chat, with_img


@pytest.fixture(scope="module")
def image_matrices(files, image_cals, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("im-img")
    outs = []
    for cal in image_cals:
        run(files, cal, d / f"{cal.stem}.gguf")
        outs.append(d / f"{cal.stem}.gguf")
    return outs[0], outs[1]


# --------------------------------------------------------------------------- oracle: transformers


def hf_imatrix(model, token_lists: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sum of squared inputs per column and row count of every nn.Linear of the layers, float64."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def f(_mod, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return f

    for i, layer in enumerate(model.model.layers):
        for hf, g in HF_LINEAR.items():
            hooks.append(layer.get_submodule(hf).register_forward_pre_hook(hook(f"blk.{i}.{g}.weight")))
    try:
        with torch.inference_mode():
            for ids in token_lists:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return sums, counts


def calibration_tokens(lm_path: Path, cal: Path) -> list[list[int]]:
    """What each item runs, as llama-imatrix counts it: raw lines cut into N_CTX pieces, chat items
    as the reference prompt; pieces under 16 tokens dropped."""
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.prompt import build_prompt

    lm = LlamaModel(lm_path, vocab_only=True)
    out = []
    for it in read_calibration(cal):
        if it.kind == "text":
            ids = lm.tokenize(it.text, parse_special=True)
            out += [ids[s : s + N_CTX] for s in range(0, len(ids), N_CTX)]
        else:
            out.append(build_prompt(it.messages()).token_ids(lm.tokenize, 0))
    lm.close()
    return [ids for ids in out if len(ids) >= 16]


def test_text_matrix_equals_transformers(files, text_cal, text_matrix, hf_qwen3):
    pieces = calibration_tokens(files[0], text_cal)
    assert len(pieces) == 5 and sorted(map(len, pieces))[-1] == N_CTX  # line 2 split, line 3 dropped
    want_sums, want_counts = hf_imatrix(hf_qwen3, pieces)
    got = read_imatrix_sums(text_matrix)
    assert sorted(got.sums) == sorted(want_sums) and len(want_sums) == 2 * len(MATMULS)
    for name, want in want_sums.items():
        assert got.counts[name].tolist() == [want_counts[name]] == [sum(map(len, pieces))], name
        s = got.sums[name].reshape(-1).astype(np.float64)
        assert s.shape == want.shape, name
        rel = np.abs(s - want) / np.maximum(want, 1e-6 * want.max())
        assert rel.max() <= RTOL, f"{name}: relative difference {rel.max():.2e}"
    assert (got.datasets, got.chunk_count, got.chunk_size) == ([str(text_cal)], len(LINES), N_CTX)


def test_llama_quantize_reader_loads_the_file(text_matrix, image_matrices):
    for path in (text_matrix, *image_matrices):
        loaded = load_like_llama_quantize(path)
        ours = read_imatrix(path)
        assert sorted(loaded.weights) == sorted(ours.values)
        for name, w in loaded.weights.items():
            assert np.array_equal(w, ours.values[name]), name
        assert loaded.datasets == ours.datasets and loaded.chunk_count == ours.chunk_count
        assert loaded.chunk_size == N_CTX and all(c[0] > 0 for c in loaded.counts.values())


# --------------------------------------------------------------------------- images


def test_image_positions_change_the_matrix(files, image_cals, image_matrices):
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.prompt import build_prompt

    chat, with_img = (read_imatrix_sums(p) for p in image_matrices)
    lm = LlamaModel(files[0], vocab_only=True)
    added = 0
    for a, b in zip(read_calibration(image_cals[0]), read_calibration(image_cals[1])):
        img = Image.open(b.media).convert("RGB")
        pa = build_prompt(a.messages()).token_ids(lm.tokenize, 0)
        pb = build_prompt([{"role": "user", "content": [img, b.text]}]).token_ids(lm.tokenize, 0)
        added += len(pb) - len(pa)
    lm.close()
    assert added >= 64 * len(QUESTIONS)
    for name in chat.sums:
        # every image position reaches every matmul: the counts grow by exactly the added positions
        assert with_img.counts[name][0] - chat.counts[name][0] == added, name
        wa = chat.sums[name] / chat.counts[name][:, None]
        wb = with_img.sums[name] / with_img.counts[name][:, None]
        change = float(np.linalg.norm(wb - wa) / np.linalg.norm(wa))
        assert change > 0.2, f"{name}: the image rows change the mean squares by only {change:.3f}"


@pytest.mark.parametrize("type_name", ["IQ2_M", "Q3_K_M"])
def test_quantizing_with_the_image_matrix_matches_llama_quantize(
    tiny_ckpt, tiny_lm_gguf, image_matrices, tmp_path, type_name
):
    assert_same_as_llama(tiny_ckpt, tiny_lm_gguf("BF16"), tmp_path, type_name, imatrix=image_matrices[1])


# --------------------------------------------------------------------------- appending


def test_append_resumes_and_adds_up(files, text_cal, text_matrix, tmp_path):
    out = tmp_path / "m.gguf"
    part = run(files, text_cal, out, max_items=2)
    assert (part.first, part.done, read_imatrix_sums(out).chunk_count) == (0, 2, 2)
    rest = run(files, text_cal, out, append=True)  # resumes after the two items it holds
    assert (rest.first, rest.done, rest.chunk_count) == (2, len(LINES) - 2, len(LINES))
    full, resumed = read_imatrix_sums(text_matrix), read_imatrix_sums(out)
    assert resumed.datasets == [str(text_cal)] and resumed.chunk_count == len(LINES)
    for name in full.sums:
        assert np.array_equal(resumed.counts[name], full.counts[name]), name
        np.testing.assert_allclose(resumed.sums[name], full.sums[name], rtol=1e-6, err_msg=name)
    assert run(files, text_cal, out, append=True).done == 0  # nothing left of this set

    other = tmp_path / "other.jsonl"
    other.write_text(text_cal.read_text())
    again = run(files, other, out, append=True)  # another set: starts at 0, counts add up
    assert (again.first, again.done, again.chunk_count) == (0, len(LINES), 2 * len(LINES))
    twice = read_imatrix_sums(out)
    assert twice.datasets == [str(text_cal), str(other)]
    for name in full.sums:
        assert twice.counts[name][0] == 2 * full.counts[name][0], name
        np.testing.assert_allclose(twice.sums[name], 2 * full.sums[name], rtol=1e-5, err_msg=name)


def test_a_bad_item_keeps_the_items_before_it(files, tmp_path):
    """A picture that does not decode stops the run with its line named; the matrix holds the items
    before it, and --append continues from there once the file is fixed."""
    picture(tmp_path / "a.png", 0)
    (tmp_path / "b.png").write_bytes(b"not a picture")
    cal = write_jsonl(
        tmp_path / "c.jsonl",
        [{"image": "a.png", "text": q} for q in QUESTIONS[:2]] + [{"image": "b.png"}, {"text": QUESTIONS[2]}],
    )
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"c\.jsonl:3: .*b\.png"):
        run(files, cal, out)
    assert read_imatrix_sums(out).chunk_count == 2
    picture(tmp_path / "b.png", 1)
    res = run(files, cal, out, append=True)
    assert (res.first, res.done, res.chunk_count) == (2, 2, 4)


# --------------------------------------------------------------------------- calibration files, CLI


def test_calibration_items(tmp_path):
    picture(tmp_path / "a.png", 0)
    (tmp_path / "sub").mkdir()
    picture(tmp_path / "sub" / "b.jpg", 1)
    cal = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"image": "a.png"},
            {"image": str(tmp_path / "sub" / "b.jpg"), "text": "Q?"},
            "plain text line",
            {"text": "chat"},
            '"a JSON string"',
        ],
    )
    items = read_calibration(cal)
    assert [(i.kind, i.text) for i in items] == [
        ("image", DEFAULT_QUESTION),
        ("image", "Q?"),
        ("text", "plain text line"),
        ("chat", "chat"),
        ("text", '"a JSON string"'),
    ]
    assert items[0].media == tmp_path / "a.png" and items[2].where == f"{cal}:3"
    folder = read_calibration(tmp_path)
    assert [i.media.name for i in folder] == ["a.png", "b.jpg"]
    for row, needle in (
        ({"image": "missing.png"}, "missing.png not found"),
        ({"img": "a.png"}, "unknown key 'img'"),
        ('{"image": ', "not valid JSON"),
        ({"image": "a.png", "video": "a.png"}, "not both"),
        ({}, "empty item"),
    ):
        bad = write_jsonl(tmp_path / "bad.jsonl", ["ok line", row])
        with pytest.raises(ValueError, match=needle) as e:
            read_calibration(bad)
        assert "bad.jsonl:2" in str(e.value)


def run_cli(*args: str):
    return helpers.run_cli("minicpm-imatrix", *args, "--quiet", timeout=600)


def test_cli_folder_of_images_and_a_video(files, tmp_path):
    from .video_fixtures import make_video

    d = tmp_path / "cal"
    d.mkdir()
    picture(d / "a.png", 3)
    make_video(d / "b.mp4", n_frames=12, fps=6, size=(64, 48))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in files:
        (model_dir / f.name).symlink_to(f)
    out = tmp_path / "im.gguf"
    res = run_cli(str(d), "--model-dir", str(model_dir), "-o", str(out), "--ctx", "1024", "-t", "2")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    im = read_imatrix_sums(out)
    assert im.chunk_count == 2 and len(im.sums) == 2 * len(MATMULS) and im.datasets == [str(d)]
    assert "items 0..1 of 2" in res.stderr


def test_cli_bad_input_is_one_line(files, tmp_path):
    lm, mm = files
    picture(tmp_path / "a.png", 0)
    good = write_jsonl(tmp_path / "good.jsonl", [{"image": "a.png"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png"}, {"image": "nope.png"}])
    out, taken = tmp_path / "im.gguf", tmp_path / "taken.gguf"
    taken.write_bytes(b"x")
    model = ("-m", str(lm), "--mmproj", str(mm))
    cases = [
        ((str(bad), *model, "-o", str(out)), "bad.jsonl:2: image file"),
        ((str(good), "-m", str(lm), "-o", str(out)), "need the mmproj"),
        ((str(tmp_path / "none.jsonl"), *model, "-o", str(out)), "calibration set not found"),
        ((str(good), "-o", str(out)), "give the model"),
        ((str(good), *model, "-o", str(taken)), "output exists"),
        ((str(good), *model, "-o", str(lm)), "would overwrite an input"),
        ((str(good), *model, "-o", str(out), "--append"), "file not found"),
        ((str(good), *model, "-o", str(out), "--chunk", "5"), "has 1 items"),
    ]
    for args, needle in cases:
        helpers.one_error_line(run_cli(*args), needle)
    assert not out.exists() and taken.read_bytes() == b"x"
