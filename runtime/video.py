"""Video input: a video file (or its bytes) -> the frames the model card samples, packed in temporal
groups (the 3D resampler turns each group into 64 tokens).

    v = load_video("clip.mp4", fps=5, packing=3)      # VideoFrames: .frames, .temporal_ids, .plan
    model.chat([{"role": "user", "content": [Video(Path("clip.mp4")), "Describe it"]}])

Sampling is video_sampling.py (the card's algorithm), decoding video_decode.py (PyAV, limits).
"""

from __future__ import annotations

import mimetypes
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .image import IMAGE_FORMATS
from .video_decode import VideoLimits, VideoSource, decode_sampled, index_video, sniff_container
from .video_sampling import (
    DEFAULT_FPS,
    MAX_NUM_FRAMES,
    MAX_NUM_PACKING,
    PACKING_LIMIT,
    VideoError,
    VideoPlan,
    plan_video_sampling,
)

__all__ = [
    "DEFAULT_FPS",
    "MAX_NUM_FRAMES",
    "MAX_NUM_PACKING",
    "PACKING_LIMIT",
    "Video",
    "VideoError",
    "VideoFrames",
    "VideoLimits",
    "VideoPlan",
    "is_video_path",
    "load_video",
    "sniff_container",
]

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .flv .f4v .wmv .asf .mpg .mpeg .m2v .vob .ts .mts .m2ts "
    ".3gp .3g2 .ogv .mxf .y4m .divx".split()
)
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .gif .webp .tif .tiff .mpo".split())  # image.IMAGE_FORMATS


@dataclass
class VideoFrames:
    frames: list[Image.Image]  # RGB, one per plan.frame_indices entry (repeated indices share one image)
    temporal_ids: list[list[int]]  # = plan.groups
    plan: VideoPlan
    n_decoded: int  # frames the decoder produced, including those decoded only to reach a sampled one


@dataclass(frozen=True)
class Video:
    """A video as chat content: a file (a path) or the file's bytes (an upload), and how it is
    sampled (load_video's arguments). `name` names it in error messages."""

    source: Path | bytes
    fps: float = DEFAULT_FPS
    packing: int | None = None
    max_frames: int = MAX_NUM_FRAMES
    limits: VideoLimits | None = None
    name: str | None = None

    def load(self, progress: bool = False) -> VideoFrames:
        return load_video(
            self.source,
            fps=self.fps,
            packing=self.packing,
            max_frames=self.max_frames,
            progress=progress,
            limits=self.limits,
            name=self.name,
        )


def load_video(
    source: str | Path | bytes,
    fps: float = DEFAULT_FPS,
    packing: int | None = None,
    max_frames: int = MAX_NUM_FRAMES,
    progress: bool = False,
    *,
    limits: VideoLimits | None = None,
    name: str | None = None,
) -> VideoFrames:
    """Sample a video (a file, or its bytes: an upload) as the model card does and decode only the
    sampled frames.

    fps: frames per second to sample (the card's choose_fps). max_frames: MAX_NUM_FRAMES.
    packing: None -> the card's dynamic packing (at most 3 frames per group); N in 1..6 -> exactly
    N frames per group (force_packing = N) and up to max_frames * N frames for long videos
    (MAX_NUM_PACKING = N). packing=1 is one frame per image. N above the card's 3 is this project's
    extension (docs/architecture.md §4): the card as published caps packing at 3.
    `limits` (VideoLimits) bounds the work; `name` names the video in errors (default: the path,
    or "<video bytes>").

    The frame count is the number of video packets (what decord, used by the card, counts);
    the container's nb_frames is not used because it is 0 in e.g. mkv/webm and may be stale.
    avg fps is the stream's average rate (decord's get_avg_fps), else its guessed rate, else
    frames / stream duration.
    """
    src = VideoSource(source, name, limits or VideoLimits())
    if packing is not None and (
        isinstance(packing, bool) or int(packing) != packing or not 1 <= packing <= PACKING_LIMIT
    ):
        raise VideoError(f"packing must be an integer in 1..{PACKING_LIMIT}, got {packing!r}")
    index, avg_fps = index_video(src)
    plan = plan_video_sampling(
        index.n_frames,
        avg_fps,
        choose_fps=fps,
        force_packing=packing,
        max_num_frames=max_frames,
        max_num_packing=MAX_NUM_PACKING if packing is None else packing,
    )
    src.check_plan(plan)
    images, n_decoded = decode_sampled(src, index, sorted(set(plan.frame_indices)), progress)
    return VideoFrames([images[i] for i in plan.frame_indices], plan.groups, plan, n_decoded)


def is_video_path(path: str | Path) -> bool:
    """True for video files: by extension, else by MIME type, else by sniffing an existing file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS:
        return False
    mime = mimetypes.guess_type(path.name)[0]
    if mime:
        return mime.startswith("video/")
    if not path.is_file():
        return False
    try:  # an image Pillow reads is an image (PyAV would also open it as a 1-frame video)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load_image reports what matters, on one line
            with Image.open(path, formats=IMAGE_FORMATS):
                return False
    except Image.UnidentifiedImageError:
        pass  # not an image Pillow knows: ask PyAV
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        return False  # an image, huge or damaged: load_image names the file and the fault
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video)
    except (av.FFmpegError, OSError, ValueError):
        return False
