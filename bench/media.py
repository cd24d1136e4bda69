"""Synthetic inputs: a picture with shapes (any size) and a video of moving shapes (PyAV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with a few filled shapes (deterministic)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 64 * np.sin(x / 37 + y / 53)], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(max(w, h) // 20, max(w, h) // 5))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + s, y0 + s], fill=color)
    return img


def variant(img: Image.Image, i: int) -> Image.Image:
    """The same picture with one pixel changed: a different content hash, so a runtime that
    caches encodings by content still encodes it again."""
    out = img.copy()
    out.putpixel((0, 0), (i % 256, (i * 7) % 256, (i * 13) % 256))
    return out


def make_video(path: Path, seconds: float = 60.0, fps: int = 10, size: tuple[int, int] = (640, 360)) -> Path:
    """H.264 (or MPEG-4 if no H.264 encoder) video of shapes moving over a gradient."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.mp4")
    w, h = size
    n = int(round(seconds * fps))
    y, x = np.mgrid[0:h, 0:w]
    bg = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 90)], -1).astype(np.uint8)
    with av.open(str(tmp), "w") as out:
        try:
            st = out.add_stream("libx264", rate=fps)
        except ValueError:  # UnknownCodecError: codec availability depends on the PyAV wheel
            st = out.add_stream("mpeg4", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = bg.copy()
            t = i / fps
            for k in range(3):
                cx = int((w - 60) * (0.5 + 0.5 * np.sin(t * (0.7 + 0.3 * k) + k)))
                cy = int((h - 60) * (0.5 + 0.5 * np.cos(t * (0.5 + 0.2 * k) + 2 * k)))
                f[cy : cy + 60, cx : cx + 60] = (255 * (k == 0), 255 * (k == 1), 255 * (k == 2))
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    tmp.replace(path)
    return path
