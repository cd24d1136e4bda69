"""Video frame sampling and decoding (runtime/video.py) against an independent re-derivation of the
model card's encode_video (docs/reference-model.md §7) and against a plain decode-everything PyAV loop."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.spatial import cKDTree  # the card's own nearest-neighbour search (its tie-breaking matters)

from minicpmv.runtime.video import MAX_NUM_PACKING, VideoError, is_video_path, load_video
from minicpmv.runtime.video_sampling import nearest_scale_index, plan_video_sampling

from .video_fixtures import make_video, make_wav, read_index

# ------------------------------------------------------------ oracle: the card, step by step ----


def card_plan(
    n_frames: int,
    fps: float,
    choose_fps: float,
    force_packing=None,
    MAX_NUM_FRAMES: int = 180,
    MAX_NUM_PACKING: int = 3,
):
    """encode_video without the decoder: len(vr) = n_frames, vr.get_avg_fps() = fps."""
    TIME_SCALE = 0.1
    video_duration = n_frames / fps
    if choose_fps * int(video_duration) <= MAX_NUM_FRAMES:
        packing_nums = 1
        choose_frames = round(min(choose_fps, round(fps)) * min(MAX_NUM_FRAMES, video_duration))
    else:
        packing_nums = math.ceil(video_duration * choose_fps / MAX_NUM_FRAMES)
        if packing_nums <= MAX_NUM_PACKING:
            choose_frames = round(video_duration * choose_fps)
        else:
            choose_frames = round(MAX_NUM_FRAMES * MAX_NUM_PACKING)
            packing_nums = MAX_NUM_PACKING

    all_idx = list(range(n_frames))
    gap = len(all_idx) / choose_frames  # ZeroDivisionError when choose_frames == 0, as in the card
    frame_idx = np.array([all_idx[int(i * gap + gap / 2)] for i in range(choose_frames)])
    if force_packing:
        packing_nums = min(force_packing, MAX_NUM_PACKING)

    frame_idx_ts = frame_idx / fps
    scale = np.arange(0, video_duration, TIME_SCALE)
    _, nearest = cKDTree(scale[:, None]).query(frame_idx_ts[:, None])
    frame_ts_id = (scale[nearest] / TIME_SCALE).astype(np.int32)
    groups = [frame_ts_id[i : i + packing_nums].tolist() for i in range(0, len(frame_ts_id), packing_nums)]
    return frame_idx.tolist(), frame_ts_id.tolist(), groups, packing_nums


def assert_plan_is_card(plan, n_frames, fps, choose_fps, force_packing=None, max_frames=180, max_packing=3):
    idx, ids, groups, packing = card_plan(n_frames, fps, choose_fps, force_packing, max_frames, max_packing)
    assert plan.frame_indices == idx
    assert plan.temporal_ids == ids
    assert plan.groups == groups
    assert plan.packing == packing
    assert plan.duration == n_frames / fps
    assert all(len(g) == packing for g in groups[:-1]) and 0 < len(groups[-1]) <= packing


# (n_frames, avg fps, choose_fps, force_packing, expected packing, expected frame count)
CASES = [
    (20, 10.0, 5, None, 1, 10),  # 2 s, no packing
    (60, 30.0, 5, None, 1, 10),
    (73, 24.0, 3, None, 1, 9),  # choose_fps 3 as in encode_video's default
    (300, 60.0, 10, None, 1, 50),  # 60 fps: timestamps k/60 hit exact 0.05 ties
    (720, 20.0, 5, None, 1, 180),  # 36 s: 5 * 36 = 180 -> still packing 1
    (738, 20.0, 5, None, 1, 184),  # 36.9 s: int(36.9) = 36 -> packing 1 but 184 frames
    (740, 20.0, 5, None, 2, 185),  # 37 s -> packing 2
    (960, 24.0, 5, None, 2, 200),  # 40 s
    (3000, 30.0, 5, None, 3, 500),  # 100 s -> ceil(500 / 180) = 3
    (1798, 29.97, 5, None, 2, 300),  # NTSC rate, 60 s
    (6000, 60.0, 5, None, 3, 500),
    (400, 2.0, 5, None, 3, 540),  # 200 s at 2 fps: capped at 540 > 400 frames -> repeats
    (108000, 30.0, 5, None, 3, 540),  # 1 h
    (216000, 60.0, 5, None, 3, 540),  # 1 h at 60 fps (ties)
    (3000, 30.0, 1, None, 1, 100),  # low choose_fps keeps packing 1 for 100 s
    (120, 30.0, 0.5, None, 1, 2),
    (12, 0.4, 5, None, 1, 0),  # 30 s at 0.4 fps: round(0.4) = 0 -> card divides by zero
    (1, 25.0, 5, None, 1, 0),  # one frame: round(5 * 0.04) = 0 -> card divides by zero
    (960, 24.0, 5, 3, 3, 200),  # force_packing
    (960, 24.0, 5, 5, 3, 200),  # force_packing capped at MAX_NUM_PACKING
    (960, 24.0, 5, 0, 2, 200),  # 0 is falsy in the card: not forced
    (100, 20.0, 5, 2, 2, 25),
]


@pytest.mark.parametrize("n, fps, choose, force, packing, count", CASES)
def test_plan_matches_card(n, fps, choose, force, packing, count):
    plan = plan_video_sampling(n, fps, choose_fps=choose, force_packing=force)
    assert plan.packing == packing
    if count == 0:  # documented deviation: the card crashes, we take the middle frame
        with pytest.raises(ZeroDivisionError):
            card_plan(n, fps, choose, force)
        assert plan.frame_indices == [n // 2] and len(plan.groups) == 1
        return
    assert len(plan.frame_indices) == count
    assert_plan_is_card(plan, n, fps, choose, force)


@pytest.mark.parametrize(
    "max_packing, n, fps, packing, count",
    [
        (6, 108000, 30.0, 6, 1080),  # 1 h with MAX_NUM_PACKING 6
        (6, 3000, 30.0, 3, 500),  # dynamic packing stays 3 for 100 s
        (4, 6000, 20.0, 4, 720),  # 300 s: ceil(1500 / 180) = 9 > 4 -> 720
        (1, 3000, 30.0, 1, 180),  # one frame per group: at most 180 frames
    ],
)
def test_plan_other_max_packing(max_packing, n, fps, packing, count):
    plan = plan_video_sampling(n, fps, max_num_packing=max_packing)
    assert (plan.packing, len(plan.frame_indices)) == (packing, count)
    assert_plan_is_card(plan, n, fps, 5, None, 180, max_packing)


def test_plan_bad_arguments():
    for kwargs in [
        dict(max_num_packing=0),
        dict(max_num_packing=7),
        dict(choose_fps=0),
        dict(choose_fps=float("nan")),
        dict(max_num_frames=0),
        dict(force_packing=-1),
    ]:
        with pytest.raises(VideoError):
            plan_video_sampling(100, 25.0, **kwargs)
    for n, fps in [(0, 25.0), (10, 0.0), (10, -1.0), (10, float("inf"))]:
        with pytest.raises(VideoError):
            plan_video_sampling(n, fps)


def test_nearest_scale_index_breaks_ties_like_ckdtree():
    ties = lower = higher = 0
    for n_scale in list(range(1, 120)) + [257, 1000, 4001, 36000]:
        scale = np.arange(0, n_scale * 0.1 - 0.05, 0.1)
        assert len(scale) == n_scale
        queries = [np.arange(int(n_scale * 0.1 * f) + 3) / f for f in (20, 24, 30, 40, 60, 120)]
        queries.append((scale[:-1] + scale[1:]) / 2)
        q = np.concatenate(queries)
        _, ref = cKDTree(scale[:, None]).query(q[:, None])
        got = nearest_scale_index(q, scale)
        np.testing.assert_array_equal(got, ref, err_msg=f"scale of {n_scale}")
        if 1 < n_scale < 120:  # count the exact ties (brute force squared distances)
            d = (scale[:, None] - q[None, :]) ** 2
            two = np.sort(d, axis=0)[:2]
            tie = two[0] == two[1]
            ties += int(tie.sum())
            lower += int((tie & (ref == d.argmin(axis=0))).sum())
            higher += int((tie & (ref != d.argmin(axis=0))).sum())
    # the tie rule matters: both outcomes occur, so "always the lower one" would fail
    assert ties > 1000 and lower > 100 and higher > 100, (ties, lower, higher)


# ------------------------------------------------------------------------- real files ----

VIDEOS = {  # name: (n_frames, fps, size, codec, b_frames, gop)
    "short.mp4": (20, 10, (64, 48), "mpeg4", 0, 12),  # 2 s: packing 1
    "mid.mp4": (960, 24, (64, 48), "mpeg4", 0, 12),  # 40 s: packing 2
    "p3.mkv": (500, 5, (32, 32), "mpeg4", 0, 25),  # 100 s: packing 3, mkv has no frame count
    "cap.mp4": (600, 5, (32, 32), "mpeg4", 0, 50),  # 120 s: 540 of 600 frames
    "cap_rep.mp4": (400, 2, (32, 32), "mpeg4", 0, 12),  # 200 s: 540 frames out of 400 (repeats)
    "bframes.mp4": (300, 30, (64, 48), "libx264", 2, 30),  # 10 s h264 with B-frames (reordered pts)
    "ntsc.mkv": (150, Fraction(30000, 1001), (64, 48), "mpeg4", 0, 15),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (n, fps, size, codec, bf, gop) in VIDEOS.items():
        if codec not in av.codecs_available:
            continue
        out[name] = make_video(root / name, n, fps, size=size, codec=codec, gop=gop, b_frames=bf)
    return out


def decode_all(path: Path) -> list[np.ndarray]:
    """Naive oracle: every frame, in output order."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize(
    "name, packing, count",
    [
        ("short.mp4", 1, 10),
        ("mid.mp4", 2, 200),
        ("p3.mkv", 3, 500),
        ("cap.mp4", 3, 540),
        ("cap_rep.mp4", 3, 540),
        ("bframes.mp4", 1, 50),
        ("ntsc.mkv", 1, 25),
    ],
)
def test_load_video_matches_card(videos, name, packing, count):
    if name not in videos:
        pytest.skip(f"encoder for {name} not in this PyAV build")
    n, fps = VIDEOS[name][:2]
    v = load_video(videos[name], fps=5)
    assert (v.plan.packing, len(v.frames)) == (packing, count)
    assert v.plan.n_frames_total == n and v.plan.fps == float(fps)
    assert_plan_is_card(v.plan, n, float(fps), 5)
    assert v.temporal_ids == v.plan.groups
    # the decoded pictures are the sampled frames
    assert [read_index(im) for im in v.frames] == v.plan.frame_indices
    assert all(im.mode == "RGB" and im.size == VIDEOS[name][2] for im in v.frames)


@pytest.mark.parametrize("name", ["bframes.mp4", "mid.mp4", "ntsc.mkv"])
@pytest.mark.parametrize("fps", [5, 0.5])
def test_decoded_pixels_equal_full_decode(videos, name, fps):
    """Skipping GOPs and restarting at keyframes gives bit-identical frames, and decodes less."""
    if name not in videos:
        pytest.skip(f"encoder for {name} not in this PyAV build")
    v = load_video(videos[name], fps=fps)
    everything = decode_all(videos[name])
    for i, im in zip(v.plan.frame_indices, v.frames):
        np.testing.assert_array_equal(np.asarray(im), everything[i], err_msg=f"frame {i}")
    if fps == 0.5:  # sparse sampling: whole GOPs are never decoded
        assert v.n_decoded < len(everything) // 2, v.n_decoded


@pytest.mark.parametrize("n", [4, 5, 6])
def test_packing_above_three_is_an_extension_of_the_card(n):
    """Fidelity decision (docs/architecture.md §4): the published card runs MAX_NUM_PACKING = 3, so
    its force_packing=n packs 3 frames; packing=n (load_video, --packing) raises the card's constant
    to n (its stated range is 1..6) and packs n frames per 64-token group: an explicit extension."""
    published = card_plan(960, 24.0, 5, force_packing=n)
    assert published[3] == MAX_NUM_PACKING == 3
    plan = plan_video_sampling(960, 24.0, 5, force_packing=n, max_num_packing=n)
    assert plan.packing == n and all(len(g) == n for g in plan.groups[:-1]) and plan.groups != published[2]
    assert_plan_is_card(plan, 960, 24.0, 5, force_packing=n, max_packing=n)


def test_packing_option(videos):
    v = load_video(videos["mid.mp4"], fps=5, packing=6)  # 40 s: 200 frames in groups of 6
    assert v.plan.packing == 6 and len(v.frames) == 200
    assert [len(g) for g in v.temporal_ids] == [6] * 33 + [2]
    assert_plan_is_card(v.plan, 960, 24.0, 5, force_packing=6, max_packing=6)
    v = load_video(videos["cap_rep.mp4"], fps=5, packing=1)  # one frame per group: 180 frames
    assert len(v.frames) == 180 and all(len(g) == 1 for g in v.temporal_ids)
    assert [read_index(im) for im in v.frames] == v.plan.frame_indices
    v = load_video(videos["short.mp4"], fps=2, max_frames=3)
    assert_plan_is_card(v.plan, 20, 10.0, 2, None, 3, 3)
    for bad in (0, 7, 2.5):
        with pytest.raises(VideoError, match="packing"):
            load_video(videos["short.mp4"], packing=bad)


def test_progress_bar(videos, capfd):
    load_video(videos["mid.mp4"], fps=5, progress=True)
    assert "decoding mid.mp4" in capfd.readouterr().err
    load_video(videos["mid.mp4"], fps=5)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------- bad input ----


def test_bad_input(videos, tmp_path):
    good = videos["mid.mp4"].read_bytes()
    cases = {
        "missing.mp4": None,
        "empty.mp4": b"",
        "text.mp4": b"this is not a video\n" * 100,
        "random.mp4": np.random.default_rng(0).integers(0, 256, 8000, dtype=np.uint8).tobytes(),
        "truncated.mp4": good[: len(good) // 2],  # moov atom at the end is gone
        "garbled.mp4": good[:3000] + bytes(20000) + good[23000:],
        "notes.txt": b"ffmpeg would render this as an ANSI-art video\n" * 10,
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    make_wav(tmp_path / "audio.wav")
    cases["audio.wav"] = b""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "still.png")
    cases["still.png"] = b""
    for name in cases:
        with pytest.raises(VideoError) as e:
            load_video(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "\n" not in msg, msg
    assert "no video stream" in str(pytest.raises(VideoError, load_video, tmp_path / "audio.wav").value)
    with pytest.raises(VideoError, match="not a file"):
        load_video(tmp_path)


def test_is_video_path(videos, tmp_path):
    assert is_video_path("clip.MP4") and is_video_path("a/b.webm") and is_video_path("x.mov")
    assert not is_video_path("photo.jpg") and not is_video_path("anim.gif") and not is_video_path("notes.txt")
    noext = tmp_path / "clip"
    noext.write_bytes(videos["short.mp4"].read_bytes())
    assert is_video_path(noext)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "pic", format="PNG")
    assert not is_video_path(tmp_path / "pic")
    assert not is_video_path(tmp_path / "does-not-exist")
