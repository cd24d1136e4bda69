"""A calibration set for minicpm-imatrix: a folder of images/videos, or a JSONL file.

- folder: every image and video file in it (subfolders included, sorted by path), each asked
  DEFAULT_QUESTION (DEFAULT_VIDEO_QUESTION for videos);
- JSONL (any other file): one item per non-empty line,
    {"image": "cat.jpg", "text": "What is this?"}   an image question (text optional),
    {"video": "clip.mp4", "text": "..."}             a video question (text optional),
    {"text": "..."}                                  a text-only chat turn,
    any line that is not a JSON object               plain text, run as it is (no chat template),
                                                     as llama-imatrix runs its text file.
  Relative media paths are resolved against the JSONL file's folder.
Everything is checked before the model is loaded, so a typo fails in a second, not an hour in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from minicpmv.runtime.video import Video

DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_VIDEO_QUESTION = "Describe this video in detail."
_KEYS = {"image", "video", "text"}


@dataclass(frozen=True)
class Item:
    kind: str  # "image", "video", "chat" (text-only turn) or "text" (raw text)
    text: str
    media: Path | None = None
    where: str = ""  # "calib.jsonl:7" or the media path, for messages

    @property
    def needs_vision(self) -> bool:
        return self.media is not None

    def messages(self) -> list[dict]:
        """The chat messages of an image/video/chat item (the runtime's input format)."""
        content: list = [] if self.media is None else ([Video(self.media)] if self.kind == "video" else [self.media])
        return [{"role": "user", "content": content + [self.text]}]


def read_calibration(path: Path) -> list[Item]:
    """Items of a calibration folder or JSONL file; ValueError (one line) on any bad entry."""
    from minicpmv.runtime.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    path = Path(path)
    if path.is_dir():
        items = []
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
            ext = p.suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                items.append(Item("image", DEFAULT_QUESTION, p, str(p)))
            elif ext in VIDEO_EXTENSIONS:
                items.append(Item("video", DEFAULT_VIDEO_QUESTION, p, str(p)))
        if not items:
            raise ValueError(f"{path}: no image or video files in this folder")
        return items
    if not path.is_file():
        raise ValueError(f"{path}: calibration set not found (give a folder of images/videos or a JSONL file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not a UTF-8 text file ({e.reason}); give a folder of images or a JSONL file"
        ) from None
    items = [_item(line, f"{path}:{i}", path.parent) for i, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise ValueError(f"{path}: no calibration items (empty file)")
    return items


def _item(line: str, where: str, base: Path) -> Item:
    s = line.strip()
    if not s.startswith("{"):
        return Item("text", line, None, where)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        return Item("text", line, None, where)
    unknown = set(obj) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected image, video, text)")
    if "image" in obj and "video" in obj:
        raise ValueError(f'{where}: give either "image" or "video", not both')
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f'{where}: "text" must be a string')
    for kind in ("image", "video"):
        if kind in obj:
            if not isinstance(obj[kind], str) or not obj[kind]:
                raise ValueError(f'{where}: "{kind}" must be a file path')
            p = Path(obj[kind]).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise ValueError(f"{where}: {kind} file {p} not found")
            default = DEFAULT_QUESTION if kind == "image" else DEFAULT_VIDEO_QUESTION
            return Item(kind, default if text is None else text, p, where)
    if not text:
        raise ValueError(f'{where}: empty item (give "image", "video" or "text")')
    return Item("chat", text, None, where)
