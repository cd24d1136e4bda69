"""mtmd's llava-uhd slicing rules (docs/llamacpp.md §4.2) restated, to pick test images whose
preprocessing mtmd and the reference agree on (the oracle itself is runtime/mtmd.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlicePlan:
    overview: tuple[int, int]  # (w, h)
    grid: tuple[int, int]  # (cols, rows); (0, 0) = no slices
    refined: tuple[int, int] | None  # (w, h) of the image the slices are cut from
    slice: tuple[int, int] | None  # (w, h) of each slice


def _round_half_away(x: float) -> int:
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def _ensure_divide(n: int, p: int) -> int:
    return max(_round_half_away(n / p) * p, p)


def _best_resize(w: int, h: int, size: int, patch: int, upscale: bool) -> tuple[int, int]:
    if w * h > size * size or upscale:
        r = w / h
        h = int(size / math.sqrt(r))
        w = int(h * r)
    return _ensure_divide(w, patch), _ensure_divide(h, patch)


def mtmd_plan(w: int, h: int, size: int = 448, patch: int = 14, max_slices: int = 9) -> SlicePlan:
    if w <= size and h <= size:
        return SlicePlan((size, size), (0, 0), None, None)
    overview = _best_resize(w, h, size, patch, False)
    log_ratio = math.log(w / h)
    multiple = min(math.ceil(w * h / (size * size)), max_slices)
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - math.log(m / (n // m)))
                if err < best_err:
                    best, best_err = (m, n // m), err
    gx, gy = best
    cw, ch = _ensure_divide(w, gx) // gx, _ensure_divide(h, gy) // gy
    bw, bh = _best_resize(cw, ch, size, patch, True)
    return SlicePlan(overview, (gx, gy), (bw * gx, bh * gy), (bw, bh))


def mtmd_preprocess(image: np.ndarray) -> list[np.ndarray]:
    """The uint8 images mtmd feeds its encoder for `image` [H, W, 3], in chunk order (overview,
    then slices row-major), redone with PIL: the overview is stretched (bicubic), the refined image
    is resized keeping its aspect (ceil) and centred on a black canvas (PAD_CEIL), then cropped.
    mtmd's resampler is a port of Pillow's, so the pixels agree with PIL's BICUBIC."""
    from PIL import Image

    h, w = image.shape[:2]
    plan = mtmd_plan(w, h)
    src = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))

    def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
        return im if im.size == size else im.resize(size, Image.BICUBIC)

    out = [np.asarray(resize(src, plan.overview))]
    if plan.grid == (0, 0):
        return out
    tw, th = plan.refined
    if (tw, th) == (w, h):
        refined = src
    else:  # float32 scale and ceil as mtmd's img_tool::resize
        scale = min(np.float32(tw) / np.float32(w), np.float32(th) / np.float32(h))
        nw = min(int(np.ceil(np.float32(w) * scale)), tw)
        nh = min(int(np.ceil(np.float32(h) * scale)), th)
        refined = Image.new("RGB", (tw, th), (0, 0, 0))
        refined.paste(resize(src, (nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    arr = np.asarray(refined)
    sw, sh = plan.slice
    for r in range(plan.grid[1]):
        for c in range(plan.grid[0]):
            out.append(arr[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw])
    return out
