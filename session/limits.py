"""Bounds on what one upload or one request can make the model do, shared by the web page and the
API server (flags of the same names on both). Each default fits a laptop serving one person; each
bound is checked before the work it bounds starts, and a request beyond one gets a one-line error
naming the limit and its flag (FLAGS)."""

from __future__ import annotations

from dataclasses import dataclass

from minicpmv.runtime.video import VideoLimits

MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_upload_mb: float = 64  # one file uploaded to the page
    max_body_mb: float = 100  # one API request body (media inline as base64: 4/3 of their size)
    max_image_pixels: int = 40_000_000  # decoded pixels of one image (a 40 MP RGB image is 120 MB)
    max_video_seconds: float = 600.0
    max_video_frames: int = 256  # distinct frames sampled from one video (kept as RGB images)
    max_video_pixels: int = 1920 * 1088  # one frame's width x height (1080p; 256 of them ~ 1.6 GB)
    max_new_tokens: int = 8192  # a request asking for more is refused; the cap is shown
    max_queue: int = 16  # requests waiting for the model; beyond it: busy

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)

    def video(self) -> VideoLimits:
        """What the engine checks while decoding a video upload: these bounds, and only the
        documented containers and codecs (runtime.video.CONTAINER_MAGIC, VIDEO_CODECS)."""
        return VideoLimits(
            max_seconds=self.max_video_seconds,
            max_frames=self.max_video_frames,
            max_pixels=self.max_video_pixels,
            checked=True,
        )

    def check_max_tokens(self, n: int, field: str = "max_tokens") -> None:
        if n < 1:
            raise ValueError(f"{field} must be at least 1, got {n}")
        if n > self.max_new_tokens:
            raise ValueError(f"{field} {n} is more than the limit of {self.max_new_tokens} ({FLAGS['max_new_tokens']})")


DEFAULT_LIMITS = Limits()

# The command-line flag of each bound (the page's and the server's), named in their error messages.
FLAGS = {
    "max_upload_mb": "--max-upload-mb",
    "max_body_mb": "--max-body-mb",
    "max_image_pixels": "--max-image-pixels",
    "max_video_seconds": "--max-video-seconds",
    "max_video_frames": "--max-video-frames",
    "max_video_pixels": "--max-video-pixels",
    "max_new_tokens": "--max-new-tokens",
    "max_queue": "--max-queue",
}
