"""Video through the 3D resampler (issue 7): grouped output vs the reference, token savings, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minicpmv.runtime import MiniCPMV
from minicpmv.runtime.image import slice_image
from minicpmv.runtime.video import load_video
from minicpmv.runtime.vision import VisionEncoder

from .helpers import one_error_line, run_cli
from .reference_vision import ReferenceVision
from .video_fixtures import make_video

F32_TOL = 1e-4


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    # 3 s at 10 fps: sampled at 5 fps -> 15 frames; 64x48 so it decodes in milliseconds
    return make_video(tmp_path_factory.mktemp("vid") / "clip.mp4", 30, 10)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_group_of_n_frames_matches_reference(tiny_ckpt, tiny_mmproj_gguf, video, n):
    """One group of n decoded frames (max_slice_nums 1, as the reference runs video) -> 64 tokens."""
    frames = load_video(video, fps=5, packing=n)
    group = frames.temporal_ids[0]
    assert len(group) == n
    px = [slice_image(f, max_slice_nums=1).pixel_values()[0] for f in frames.frames[:n]]
    enc = VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="f32", n_threads=1)
    got = enc.encode_slices(px, [group])
    want = ReferenceVision(tiny_ckpt).embed(px, [group]).numpy()
    assert got.shape == want.shape == (1, 64, enc.embed_dim)
    assert np.abs(got - want).max() < F32_TOL


@pytest.fixture(scope="module")
def model(tiny_lm_gguf, tiny_mmproj_gguf):
    m = MiniCPMV.load(tiny_lm_gguf("F32"), tiny_mmproj_gguf("f32"), n_ctx=4096, n_threads=1)
    yield m
    m.close()


def test_packing_three_frames_costs_64_tokens_not_192(model, video):
    packed = load_video(video, fps=5, packing=3)
    single = load_video(video, fps=5, packing=1)
    assert len(packed.frames) == len(single.frames) == 15
    q = ["Describe the video"]
    a = model.chat(
        [{"role": "user", "content": packed.frames + q}],
        temporal_ids=packed.temporal_ids,
        use_image_id=False,
        max_slice_nums=1,
        max_new_tokens=1,
        greedy=True,
    )
    slots_packed, tokens_packed = a.stats.slots_prefilled, a.stats.prompt_tokens
    model.reset()
    b = model.chat(
        [{"role": "user", "content": single.frames + q}],
        temporal_ids=single.temporal_ids,
        use_image_id=False,
        max_slice_nums=1,
        max_new_tokens=1,
        greedy=True,
    )
    assert slots_packed == 5 and b.stats.slots_prefilled == 15  # 15 frames: 5 groups vs 15 images
    # each group drops 2 placeholders (64 slots + <image></image>) and the "\n" between them
    assert b.stats.prompt_tokens - tokens_packed == 10 * (64 + 2 + 1)


def test_cli_video(tiny_lm_gguf, tiny_mmproj_gguf, video):
    res = run_cli(
        "minicpm-run",
        "--model",
        tiny_lm_gguf("F32"),
        "--mmproj",
        tiny_mmproj_gguf("f32"),
        video,
        "Describe the video",
        "--packing",
        "3",
        "--max-tokens",
        "3",
        "--json",
        "--threads",
        "1",
    )
    assert res.returncode == 0, res.stderr
    import json

    out = json.loads(res.stdout)
    assert out["timings"]["slots_prefilled"] == 5


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50, None])
def test_cli_bad_video(tiny_lm_gguf, tiny_mmproj_gguf, video, tmp_path, content):
    bad = tmp_path / "bad.mp4"
    if content is None:  # a truncated real file
        bad.write_bytes(video.read_bytes()[:300])
    else:
        bad.write_bytes(content)
    res = run_cli(
        "minicpm-run",
        "--model",
        tiny_lm_gguf("F32"),
        "--mmproj",
        tiny_mmproj_gguf("f32"),
        bad,
        "Describe the video",
        "--max-tokens",
        "2",
    )
    one_error_line(res, "bad.mp4", code=None)
