"""Media for a conversation: the operator's own files (the CLI's arguments, loaded as the engine
loads any file) and uploads (the page's files, the API's inline data), which are bytes held to the
Limits: size, image formats and pixels, video container, codec, length, frames and frame size.

Every failure is a MediaError (a ValueError) with one line naming the upload by its own name."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from minicpmv.runtime import content
from minicpmv.runtime.image import ImageError, load_image
from minicpmv.runtime.video import VideoError, VideoFrames, load_video, sniff_container

from .limits import FLAGS, Limits
from .options import MediaOptions

Media = Image.Image | VideoFrames


class MediaError(ValueError):
    """An upload or a media file that cannot be used; the message is one line."""


def load_file(path: Path, media: MediaOptions, progress: bool = False) -> Media:
    """An image or a video file named by the operator (not by a remote user): an RGB image, or a
    video's sampled frames (--fps / --packing / --max-frames)."""
    try:
        return content.load_media(
            path, fps=media.fps, packing=media.packing, max_frames=media.max_frames, progress=progress
        )
    except (ValueError, OSError) as e:
        raise MediaError(" ".join(str(e).split())) from None


def load_upload(data: bytes, name: str, media: MediaOptions, limits: Limits, kind: str | None = None) -> Media:
    """Bytes sent by a user: "image" or "video" (`kind`), or told by content when None (a video
    container's signature, else an image). Decoded under `limits`; `name` names it in errors."""
    if len(data) > limits.max_upload_bytes:
        raise MediaError(
            f"{name}: {len(data) / 2**20:.1f} MB is more than the limit of {limits.max_upload_mb:g} MB "
            f"({FLAGS['max_upload_mb']})"
        )
    if kind is None:
        kind = "video" if sniff_container(data[:12]) else "image"
    try:
        if kind == "video":
            return load_video(
                data,
                fps=media.fps,
                packing=media.packing,
                max_frames=media.max_frames,
                limits=limits.video(),
                name=name,
            )
        return load_image(data, name=name, max_pixels=limits.max_image_pixels)
    except (ImageError, VideoError) as e:
        msg = " ".join(str(e).split())
        flag = FLAGS.get(_LIMITS.get(e.limit, ""))
        raise MediaError(f"{msg} ({flag})" if flag else msg) from None


# the engine's name of a bound -> ours (limits.FLAGS)
_LIMITS = {
    "max_image_pixels": "max_image_pixels",
    "max_seconds": "max_video_seconds",
    "max_frames": "max_video_frames",
    "max_pixels": "max_video_pixels",
}


def describe_media(item: Media) -> str:
    """ "640x480", or "15 frames in 5 groups of up to 3" for a video."""
    if isinstance(item, VideoFrames):
        return f"{len(item.frames)} frames in {len(item.temporal_ids)} groups of up to {item.plan.packing}"
    return f"{item.width}x{item.height}"
