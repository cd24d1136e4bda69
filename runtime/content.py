"""Conversation content -> what the prompt is built from (text, RGB images, video frames), and the
per-conversation defaults.

Content items of `MiniCPMV.chat` messages (a message's content is a str or a list of items):
- text: a `str`, always, as in the reference `chat()`: a string is never opened as a file;
- an image: a `PIL.Image.Image`, or a `pathlib.Path` of an image file;
- a video: a `pathlib.Path` of a video file (sampled with the model card's defaults), a `Video`
  (a file or its bytes, with fps / packing / max_frames), or `VideoFrames` already sampled.
Assistant messages hold text only. A video becomes its sampled frames packed in temporal groups. A
conversation that holds a video uses the model card's video settings (one slice per frame, no image
ids) unless the caller says otherwise (docs/reference-model.md §5.2).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from minicpmv.schema import MAX_SLICE_NUMS, VIDEO_MAX_SLICE_NUMS

from . import video
from .image import load_image
from .prompt import Prompt, PromptError, build_prompt
from .video import Video, VideoFrames


def load_media(
    path: str | os.PathLike,
    *,
    fps: float = video.DEFAULT_FPS,
    packing: int | None = None,
    max_frames: int = video.MAX_NUM_FRAMES,
    progress: bool = False,
) -> Image.Image | VideoFrames:
    """A file as content: a video file as its sampled frames, anything else as an RGB image."""
    if video.is_video_path(path):
        return video.load_video(Path(path), fps=fps, packing=packing, max_frames=max_frames, progress=progress)
    return load_image(Path(path))


def _describe(c) -> str:
    return type(c).__name__


class Content:
    """Loads the content items of a conversation; the last video's frames are kept, so later turns
    of a conversation about it do not decode it again."""

    def __init__(self) -> None:
        self._video: tuple[tuple, VideoFrames] | None = None
        self.opened = 0  # image and video files opened (tests: text is never opened)

    def item(self, c):
        """One content item -> str, RGB PIL image or VideoFrames (paths and Videos are loaded)."""
        if isinstance(c, str):
            return c
        if isinstance(c, Image.Image):
            return load_image(c)
        if isinstance(c, VideoFrames):
            return c
        if isinstance(c, Video):
            return self.video(c)
        if isinstance(c, os.PathLike):
            self.opened += 1
            return self.video(Video(Path(c))) if video.is_video_path(c) else load_image(Path(c))
        raise PromptError(
            f"a content item of type {_describe(c)}: give text as str, images as PIL images or "
            "pathlib.Path, videos as pathlib.Path or runtime.Video"
        )

    def video(self, v: Video) -> VideoFrames:
        """Decoded once per (file version or bytes, sampling)."""
        if isinstance(v.source, (bytes, bytearray, memoryview)):
            origin: tuple = ("bytes", hashlib.blake2b(bytes(v.source), digest_size=16).digest())
        else:
            p = Path(v.source)
            st = p.stat() if p.is_file() else None
            origin = (str(p.resolve()), st and st.st_size, st and st.st_mtime_ns)
        key = (origin, v.fps, v.packing, v.max_frames, v.limits)
        if self._video is None or self._video[0] != key:
            self.opened += 1
            self._video = (key, v.load())
        return self._video[1]

    def load_items(self, msgs: list[dict]) -> tuple[list[dict], list[list[int]] | None]:
        """Load every content item; videos become their frames. Returns the messages and, when a
        video is present, the temporal groups of every image in order (a still image is its own
        group [-1], i.e. no temporal term, as the reference without temporal_ids)."""
        out, groups, has_video = [], [], False
        for m in msgs:
            content = m.get("content")
            items = [content] if isinstance(content, str) else list(content or [])
            if m.get("role") == "assistant" and not all(isinstance(c, str) for c in items):
                raise PromptError("assistant messages hold text only")
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

    def prompt(
        self,
        msgs: list[dict],
        *,
        enable_thinking: bool = False,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: list[list[int]] | None = None,
        query_num: int,
    ) -> Prompt:
        """The reference's prompt for `msgs`, with the per-conversation defaults: max_slice_nums
        MAX_SLICE_NUMS and image ids, or VIDEO_MAX_SLICE_NUMS and none when the conversation holds a
        video."""
        msgs, video_groups = self.load_items(msgs)
        if video_groups is not None:
            if temporal_ids is not None:
                raise PromptError("give videos either as video items or as frames with temporal_ids, not both")
            temporal_ids = video_groups
        has_video = video_groups is not None
        if max_slice_nums is None:
            max_slice_nums = VIDEO_MAX_SLICE_NUMS if has_video else MAX_SLICE_NUMS
        if use_image_id is None:
            use_image_id = not has_video
        return build_prompt(
            msgs,
            system_prompt=system_prompt,
            enable_thinking=enable_thinking,
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            temporal_ids=temporal_ids,
            query_num=query_num,
        )
