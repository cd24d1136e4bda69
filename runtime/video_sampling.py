"""Which frames of a video the model sees: the model card's `encode_video` sampling, as a pure function.

MiniCPM-V 4.5 packs up to `packing` consecutive frames into one resampler query (64 tokens per
group). The model card (docs/reference-model.md §7) picks the frames and their temporal ids like this:

    duration = n_frames / avg_fps
    if choose_fps * int(duration) <= MAX_NUM_FRAMES:   packing 1,
        n = round(min(choose_fps, round(avg_fps)) * min(MAX_NUM_FRAMES, duration))
    else: packing = ceil(duration * choose_fps / MAX_NUM_FRAMES)
        packing <= MAX_NUM_PACKING: n = round(duration * choose_fps)
        otherwise:                 n = MAX_NUM_FRAMES * MAX_NUM_PACKING, packing = MAX_NUM_PACKING
    frame i = int(i * gap + gap / 2), gap = n_frames / n          (uniform sampling)
    force_packing -> packing = min(force_packing, MAX_NUM_PACKING)
    temporal id = nearest value of arange(0, duration, 0.1) to index / avg_fps, / 0.1, int32
    groups = consecutive chunks of `packing` ids

`plan_video_sampling` is that algorithm; video_decode.py decodes only the frames it picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

DEFAULT_FPS = 5  # frames sampled per second: the model card's example (its encode_video default is 3)
MAX_NUM_FRAMES = 180  # frames after packing (= groups) in the model card
MAX_NUM_PACKING = 3  # model card default
PACKING_LIMIT = 6  # the model card's valid range for MAX_NUM_PACKING is 1..6
TIME_SCALE = 0.1  # temporal ids are in 0.1 s units


class VideoError(ValueError):
    """Bad video input or argument: the message is one line naming the file or argument. `limit`
    names the VideoLimits bound exceeded ("max_seconds", "max_frames", "max_pixels"), if that is
    the fault."""

    def __init__(self, message: str, limit: str | None = None):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class VideoPlan:
    frame_indices: list[int]  # sampled frame numbers in presentation order (may repeat for short videos)
    temporal_ids: list[int]  # one per sampled frame, 0.1 s units
    groups: list[list[int]]  # temporal ids chunked by `packing`: what chat(temporal_ids=...) takes
    packing: int
    duration: float  # seconds = n_frames_total / fps
    n_frames_total: int
    fps: float


def plan_video_sampling(
    n_frames_total: int,
    avg_fps: float,
    choose_fps: float = DEFAULT_FPS,
    force_packing: int | None = None,
    max_num_frames: int = MAX_NUM_FRAMES,
    max_num_packing: int = MAX_NUM_PACKING,
) -> VideoPlan:
    """The model card's encode_video, minus the decoding. Python `round` (half to even) as there.

    One deviation: where the card would ask for 0 frames (a clip shorter than half a sample
    interval, or avg_fps < 0.5 so round(fps) == 0) it divides by zero; we take 1 frame.
    """
    if isinstance(n_frames_total, bool) or not isinstance(n_frames_total, (int, np.integer)) or n_frames_total < 1:
        raise VideoError(f"video has no frames (n_frames_total={n_frames_total!r})")
    if not (math.isfinite(avg_fps) and avg_fps > 0):
        raise VideoError(f"video frame rate must be a positive number, got {avg_fps!r}")
    if not (math.isfinite(choose_fps) and choose_fps > 0):
        raise VideoError(f"fps must be a positive number, got {choose_fps!r}")
    if int(max_num_frames) != max_num_frames or max_num_frames < 1:
        raise VideoError(f"max frames must be a positive integer, got {max_num_frames!r}")
    if int(max_num_packing) != max_num_packing or not 1 <= max_num_packing <= PACKING_LIMIT:
        raise VideoError(f"packing must be an integer in 1..{PACKING_LIMIT}, got {max_num_packing!r}")
    if force_packing is not None and (int(force_packing) != force_packing or force_packing < 0):
        raise VideoError(f"force_packing must be a non-negative integer, got {force_packing!r}")

    n_total, fps = int(n_frames_total), float(avg_fps)
    duration = n_total / fps
    if choose_fps * int(duration) <= max_num_frames:
        packing = 1
        n_sample = round(min(choose_fps, round(fps)) * min(max_num_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_num_frames)
        if packing <= max_num_packing:
            n_sample = round(duration * choose_fps)
        else:
            n_sample = round(max_num_frames * max_num_packing)
            packing = int(max_num_packing)
    n_sample = max(1, n_sample)

    gap = n_total / n_sample
    indices = [int(i * gap + gap / 2) for i in range(n_sample)]
    if force_packing:  # truthiness as in the card: 0 means "not forced"
        packing = min(int(force_packing), int(max_num_packing))

    timestamps = np.asarray(indices) / fps
    scale = np.arange(0, duration, TIME_SCALE)
    ids = (scale[nearest_scale_index(timestamps, scale)] / TIME_SCALE).astype(np.int32).tolist()
    groups = [ids[i : i + packing] for i in range(0, len(ids), packing)]
    return VideoPlan(indices, ids, groups, packing, duration, n_total, fps)


def nearest_scale_index(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Index of the nearest `scale` entry (sorted, distinct) for each value, as scipy's cKDTree.

    The card snaps with cKDTree(scale[:, None]).query. Away from ties that is plain nearest
    neighbour on squared distances. Exact ties (a timestamp at the midpoint of two grid values,
    e.g. frame k at 20/40/60 fps) are common, and cKDTree breaks them by its tree layout: the
    lower value wins when the two sit in different leaves, else whichever comes first inside
    the leaf. `_kdtree_leaf_layout` rebuilds that layout (verified against scipy in the tests).
    """
    values = np.asarray(values, dtype=np.float64)
    j = np.searchsorted(scale, values)
    lo = np.clip(j - 1, 0, len(scale) - 1)
    hi = np.clip(j, 0, len(scale) - 1)
    d_lo = np.abs(scale[lo] - values) ** 2  # same float ops as cKDTree's p=2 distance
    d_hi = np.abs(scale[hi] - values) ** 2
    out = np.where(d_hi < d_lo, hi, lo)
    ties = np.flatnonzero((d_hi == d_lo) & (hi != lo))
    if len(ties):
        leaf, slot = _kdtree_leaf_layout(len(scale))
        for t in ties:
            a, b = lo[t], hi[t]
            out[t] = b if leaf[a] == leaf[b] and slot[b] < slot[a] else a
    return out


_KDTREE_LEAFSIZE = 16  # cKDTree default


@lru_cache(maxsize=8)
def _kdtree_leaf_layout(n: int) -> tuple[list[int], list[int]]:
    """Leaf id and position inside the leaf of each point of cKDTree(sorted distinct 1-D data).

    cKDTree (balanced_tree=True) splits a node of more than 16 points at its median with
    std::nth_element over its index array and recurses on both halves; points are then scanned
    leaf by leaf in index-array order with a strict `<`, so the first of two equidistant points
    wins. For sorted data, comparing values is comparing indices. Linux wheels use libstdc++,
    whose nth_element is replicated in `_nth_element`.
    """
    order = list(range(n))
    leaf, slot = [0] * n, [0] * n
    stack = [(0, n)]
    while stack:
        start, end = stack.pop()
        if end - start <= _KDTREE_LEAFSIZE:
            for k in range(start, end):
                leaf[order[k]], slot[order[k]] = start, k
            continue
        mid = start + (end - start) // 2
        _nth_element(order, start, mid, end)
        stack += [(start, mid), (mid, end)]
    return leaf, slot


def _nth_element(a: list[int], first: int, nth: int, last: int) -> None:
    """libstdc++ std::nth_element (introselect: median-of-3 pivot, then insertion sort)."""
    depth = 2 * ((last - first).bit_length() - 1)
    while last - first > 3:
        if depth == 0:  # heap-select fallback; never reached for sorted input (checked to 400k points)
            raise RuntimeError("nth_element depth limit reached")
        depth -= 1
        x, y, z = first + 1, first + (last - first) // 2, last - 1
        if a[x] < a[y]:
            m = y if a[y] < a[z] else (z if a[x] < a[z] else x)
        else:
            m = x if a[x] < a[z] else (z if a[y] < a[z] else y)
        a[first], a[m] = a[m], a[first]
        pivot, lo, hi = a[first], first + 1, last
        while True:  # unguarded partition
            while a[lo] < pivot:
                lo += 1
            hi -= 1
            while pivot < a[hi]:
                hi -= 1
            if not lo < hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        if lo <= nth:
            first = lo
        else:
            last = lo
    for i in range(first + 1, last):  # insertion sort
        v = a[i]
        if v < a[first]:
            a[first + 1 : i + 1] = a[first:i]
            a[first] = v
        else:
            k = i
            while v < a[k - 1]:
                a[k] = a[k - 1]
                k -= 1
            a[k] = v
