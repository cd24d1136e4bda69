"""Media in a request -> the engine's content items, under the server's limits.

Media come inline: a `data:` URI (OpenAI's image_url and video_url parts), bare base64 (llama.cpp's
input_video, Ollama's images). A `file://` URL is read only from under the operator's
--allowed-local-media folder (vLLM's --allowed-local-media-path); http(s) URLs are never fetched (a
request must not make the server reach other hosts). Every item is held to the Limits
(session/limits.py) and decoded by the session layer (session/media.py) before the request waits
for the model; a video is decoded once for a run of requests that send the same bytes with the same
sampling (an OpenAI client resends the whole conversation every turn), and at most one video is
decoded at a time, so concurrent requests cannot multiply its memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from minicpmv.session.limits import FLAGS, Limits
from minicpmv.session.media import Media, MediaError, load_upload
from minicpmv.session.options import MediaOptions

from .errors import APIError, bad_request


class MediaLoader:
    def __init__(self, limits: Limits, allowed_local: Path | None = None):
        self.limits = limits
        self.allowed_local = allowed_local.resolve() if allowed_local is not None else None
        self._video_lock = threading.Lock()  # one video decoded at a time
        self._last_video: tuple[tuple, Media] | None = None

    # -- sources -------------------------------------------------------------------------------

    def from_url(self, url: str, param: str) -> bytes:
        """The bytes a media URL names: a data: URI, or a file:// URL under --allowed-local-media."""
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}: a media URL is required", param)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            head, sep, data = url.partition(",")
            if not sep or not head.lower().endswith(";base64"):
                raise bad_request(f"{param}: only base64 data URIs are accepted (data:<type>;base64,...)", param)
            return self.from_base64(data, param)
        if scheme == "file":
            return self._local_file(url, param)
        if scheme in ("http", "https"):
            raise bad_request(
                f"{param}: this server does not fetch media from URLs ({scheme}://); send the file "
                "inline as a data: URI (data:image/jpeg;base64,...)",
                param,
            )
        raise bad_request(f"{param}: unsupported media URL (give a data: URI)", param)

    def from_base64(self, data: str, param: str) -> bytes:
        if not isinstance(data, str):
            raise bad_request(f"{param}: base64 data must be a string", param)
        limit = self.limits.max_upload_bytes
        if len(data) * 3 // 4 > limit + 3:  # checked before decoding
            raise APIError(
                413,
                f"{param}: a media item of {len(data) * 3 / 4 / 2**20:.1f} MB is more than the limit "
                f"of {self.limits.max_upload_mb:g} MB ({FLAGS['max_upload_mb']})",
                param,
            )
        try:
            return base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: not valid base64 data", param) from None

    def _local_file(self, url: str, param: str) -> bytes:
        if self.allowed_local is None:
            raise bad_request(
                f"{param}: file:// URLs are refused: this server reads no local files unless started "
                "with --allowed-local-media DIR",
                param,
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"{param}: file:// URL with a host", param)
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(self.allowed_local):
            raise APIError(403, f"{param}: {path.name} is outside the folder allowed by --allowed-local-media", param)
        try:
            size = path.stat().st_size
            if size > self.limits.max_upload_bytes:
                raise APIError(
                    413,
                    f"{param}: {path.name} is {size / 2**20:.1f} MB, more than the limit of "
                    f"{self.limits.max_upload_mb:g} MB ({FLAGS['max_upload_mb']})",
                    param,
                )
            with open(path, "rb", opener=lambda p, f: os.open(p, f | getattr(os, "O_NOFOLLOW", 0))) as fh:
                return fh.read(self.limits.max_upload_bytes + 1)
        except OSError as e:
            raise bad_request(f"{param}: cannot read {path.name} ({e.strerror or e})", param) from None

    # -- decoding ------------------------------------------------------------------------------

    def image(self, data: bytes, param: str) -> Media:
        try:
            return load_upload(data, param, MediaOptions(), self.limits, kind="image")
        except MediaError as e:
            raise bad_request(str(e), param) from None

    def video(self, data: bytes, media: MediaOptions, param: str) -> Media:
        key = (hashlib.blake2b(data, digest_size=16).digest(), media.fps, media.packing, media.max_frames)
        with self._video_lock:
            if self._last_video is not None and self._last_video[0] == key:
                return self._last_video[1]
            self._last_video = None  # its frames are freed before the next video is decoded
            try:
                frames = load_upload(data, param, media, self.limits, kind="video")
            except MediaError as e:
                raise bad_request(str(e), param) from None
            self._last_video = (key, frames)
            return frames
