"""Small synthetic test videos written with PyAV.

Every frame carries its own index as a 12-bit pattern of black/white 8x8 cells in the top rows
(aligned to the codec's 8x8 DCT blocks, so it survives lossy coding) plus a white square that
moves across the bottom, so decoded frames can be identified exactly with `read_index`.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

CELL = 8
INDEX_BITS = 12  # frames 0..4095


def frame_picture(index: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 [height, width, 3] with `index` encoded in the top cells and a moving square."""
    assert 0 <= index < 1 << INDEX_BITS, index
    cols = width // CELL
    rows = -(-INDEX_BITS // cols)
    assert height >= (rows + 1) * CELL, "picture too small for the index pattern"
    img = np.zeros((height, width, 3), np.uint8)
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            r, c = divmod(bit, cols)
            img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = 255
    x = (index * 3) % max(1, width - CELL)  # moving shape below the pattern
    img[height - CELL :, x : x + CELL] = (255, 255, 255)
    return img


def read_index(image: Image.Image) -> int:
    """Inverse of `frame_picture` for a decoded frame."""
    a = np.asarray(image.convert("L"), dtype=np.float32)
    cols = a.shape[1] // CELL
    index = 0
    for bit in range(INDEX_BITS):
        r, c = divmod(bit, cols)
        if a[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].mean() > 128:
            index |= 1 << bit
    return index


def make_video(
    path: Path,
    n_frames: int,
    fps: float | Fraction,
    size: tuple[int, int] = (64, 48),
    codec: str = "mpeg4",
    gop: int = 12,
    b_frames: int = 0,
) -> Path:
    """Write `n_frames` frames at constant `fps` (exact Fraction for rates like 30000/1001)."""
    rate = Fraction(fps).limit_denominator(100000)
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        if codec == "libx264":
            stream.options = {
                "preset": "ultrafast" if b_frames == 0 else "veryfast",
                "crf": "10",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={b_frames}",
            }
        else:
            stream.bit_rate = 4_000_000
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_picture(i, width, height), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def make_wav(path: Path, seconds: float = 1.0, rate: int = 8000) -> Path:
    """Audio-only file (no video stream)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path
