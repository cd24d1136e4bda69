"""Conversation content -> what the prompt is built from (text, RGB images, video frames), and the
per-conversation defaults.

Content items of `MiniCPMV.chat` messages: text (str); images (PIL.Image, a Path, a str naming an
existing image file, or {'image': ...}); videos (a video file path, {'video': path, 'fps': 5,
'packing': None, 'max_frames': 180}, or a video.VideoFrames). A video becomes its sampled frames
packed in temporal groups. A conversation that holds a video uses the model card's video settings
(one slice per frame, no image ids) unless the caller says otherwise (docs/reference-model.md §5.2).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from minicpmv.schema import MAX_SLICE_NUMS, VIDEO_MAX_SLICE_NUMS

from . import video
from .image import load_image
from .prompt import Prompt, PromptError, build_prompt
from .video import VideoFrames


def load_media(path: str | os.PathLike, *, fps: float = video.DEFAULT_FPS, packing: int | None = None,
               max_frames: int = video.MAX_NUM_FRAMES, progress: bool = False) -> Image.Image | VideoFrames:
    """A file as content: a video file as its sampled frames, anything else as an RGB image."""
    if video.is_video_path(path):
        return video.load_video(Path(path), fps=fps, packing=packing, max_frames=max_frames, progress=progress)
    return load_image(Path(path))


def names_a_file(s: str) -> bool:
    """A content string naming an existing image or video file (by its extension) is that file
    (README usage: ["photo.jpg", "What is in the image?"]); any other string is text."""
    if not s or len(s) > 4096 or "\n" in s:
        return False
    suffix = Path(s).suffix.lower()
    try:
        return (suffix in Image.registered_extensions() or suffix in video.VIDEO_EXTENSIONS) and Path(s).is_file()
    except (OSError, ValueError):
        return False


class Content:
    """Loads the content items of a conversation; the last video's frames are kept, so later turns
    of a conversation about it do not decode it again."""

    def __init__(self) -> None:
        self._video: tuple[tuple, VideoFrames] | None = None

    def item(self, c):
        """One content item -> str, RGB PIL image or VideoFrames (paths and dicts are loaded)."""
        if isinstance(c, dict):
            if "video" in c:
                return self.video(c["video"], **{k: c[k] for k in ("fps", "packing", "max_frames") if k in c})
            c = c.get("image", c.get("text", c))
        if isinstance(c, Image.Image):
            return load_image(c)
        if isinstance(c, str) and not names_a_file(c):
            return c
        if isinstance(c, (str, os.PathLike)):
            return self.video(c) if video.is_video_path(c) else load_image(Path(c))
        return c  # VideoFrames, or something build_prompt will reject with a clear message

    def video(self, path, fps: float = video.DEFAULT_FPS, packing: int | None = None,
              max_frames: int = video.MAX_NUM_FRAMES) -> VideoFrames:
        """Decoded once per (file, size, mtime, sampling)."""
        p = Path(path)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), st and st.st_size, st and st.st_mtime_ns, fps, packing, max_frames)
        if self._video is None or self._video[0] != key:
            self._video = (key, video.load_video(p, fps=fps, packing=packing, max_frames=max_frames))
        return self._video[1]

    def expand(self, msgs: list[dict]) -> tuple[list[dict], list[list[int]] | None]:
        """Load every content item; videos become their frames. Returns the messages and, when a
        video is present, the temporal groups of every image in order (a still image is its own
        group [-1], i.e. no temporal term, as the reference without temporal_ids)."""
        out, groups, has_video = [], [], False
        for m in msgs:
            content = m.get("content")
            items = [content] if isinstance(content, str) else list(content or [])
            conv = []
            for c in map(self.item, items):
                if isinstance(c, Image.Image):
                    conv.append(c)
                    groups.append([-1])
                elif isinstance(c, VideoFrames):
                    conv += list(c.frames)
                    groups += [list(g) for g in c.temporal_ids]
                    has_video = True
                else:
                    conv.append(c)
            out.append({"role": m.get("role"), "content": conv})
        return out, (groups if has_video else None)

    def prompt(self, msgs: list[dict], *, enable_thinking: bool = False, system_prompt: str = "",
               max_slice_nums: int | None = None, use_image_id: bool | None = None,
               temporal_ids: list[list[int]] | None = None, query_num: int) -> Prompt:
        """The reference's prompt for `msgs`, with the per-conversation defaults: max_slice_nums
        MAX_SLICE_NUMS and image ids, or VIDEO_MAX_SLICE_NUMS and none when the conversation holds a
        video."""
        msgs, video_groups = self.expand(msgs)
        if video_groups is not None:
            if temporal_ids is not None:
                raise PromptError("give videos either as video items or as frames with temporal_ids, not both")
            temporal_ids = video_groups
        has_video = video_groups is not None
        if max_slice_nums is None:
            max_slice_nums = VIDEO_MAX_SLICE_NUMS if has_video else MAX_SLICE_NUMS
        if use_image_id is None:
            use_image_id = not has_video
        return build_prompt(msgs, system_prompt=system_prompt, enable_thinking=enable_thinking,
                            max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                            temporal_ids=temporal_ids, query_num=query_num)
