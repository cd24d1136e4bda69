"""Malformed media through every door (issue 28, point 6): random bytes, empty and truncated files,
extensions that lie, formats outside the allowlist, huge declared dimensions, decompression bombs,
videos beyond the upload limits, audio and a GIF as videos; each through

- the engine: `MiniCPMV.chat()` with a `pathlib.Path` ("chat-path"), and `Video(bytes)` for videos
  ("chat-video-bytes");
- the CLI: `minicpm-run FILE QUESTION` ("cli": typer's CliRunner; a few again as real commands);
- the page's upload handler: `LocalChat.ask()` of cli/web_chat.py ("page");
- the server's media path: a base64 data: URI through `MediaLoader` of server/media.py ("server").

Each must give one line naming the file (or the upload: its file name; the request's parameter): a
ValueError subclass in-process (the server's APIError 400/413), exit 2 and one stderr line from the
CLI; or, where the input is valid after all (the page tells a file by content, so a PNG named .mp4
is an image there), a normal answer. Never a traceback, a warning on stderr, a hang or a memory spike
over 1 GB.

The in-process cases run in one worker process (this module as `python -m tests.test_fuzz_media`, the
tiny model loaded once): faulthandler ends it when a case runs past CASE_TIMEOUT_S (the last case
started is named), and its peak RSS is read after every case. The worker also records every Pillow
plugin outside IMAGE_FORMATS that sees an input (none may: the EPS plugin hands a file to
Ghostscript, and without `formats=` an EPS named .png still ends in a tidy one-line error), every
image decoded (none, where the header must refuse it) and every video decoded (none, for a video
beyond a limit). Seeded; docs/malformed-files.md §4 has the table of cases, which `pytest -s` prints.
"""

from __future__ import annotations

import base64
import faulthandler
import io
import json
import resource
import struct
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import av
import numpy as np
import pytest
from PIL import Image

from minicpmv.runtime.video import VideoLimits
from minicpmv.session.limits import FLAGS, Limits

from .helpers import one_error_line, run_cli, run_in_process
from .test_runtime_chat import picture
from .video_fixtures import make_video, make_wav

SEED = 28
CASE_TIMEOUT_S = 30  # one input through one door; past it faulthandler ends the worker
WORKER_TIMEOUT_S = 300
MEMORY_BOUND = 1 << 30  # peak RSS over the worker's baseline
REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is it?"
IMAGE_DOORS = ("chat-path", "cli", "page", "server")
VIDEO_DOORS = ("chat-path", "chat-video-bytes", "cli", "page", "server")
UPLOADS = ("chat-video-bytes", "page", "server")  # the doors held to Limits (Video(bytes) with Limits.video())


# --------------------------------------------------------------------------- the inputs


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(w: int, h: int, *, depth: int = 8, color: int = 2, idat: bytes | None = None, text: bytes = b"") -> bytes:
    """A PNG of any declared size, with or without pixel data."""
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)) + text
    return out + (chunk(b"IDAT", idat) if idat is not None else b"") + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A 1-bit gray PNG of side x side with all its rows: 25 kB for 10000x10000, 400 MB as Pillow's RGB."""
    row = b"\0" + b"\x55" * ((side + 7) // 8)
    return png_bytes(side, side, depth=1, color=0, idat=zlib.compress(row * side, 9))


def text_chunk_bomb() -> bytes:
    """A 1x1 PNG with a compressed text chunk that inflates to 64 MB."""
    text = chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    return png_bytes(1, 1, idat=zlib.compress(b"\0\0\0\0"), text=text)


def gif_header(w: int, h: int) -> bytes:
    """A GIF whose screen and one frame are w x h, with two bytes of pixel data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0)
    return screen + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08\x02\x4c\x01\x00;"


def bmp_header(w: int, h: int) -> bytes:
    """The file and info headers of a 24-bit w x h bitmap, and no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def jpeg_header(w: int, h: int) -> bytes:
    """Start of image, a baseline frame header of w x h (3 components), a scan header, end."""
    sof = struct.pack(">BHHB", 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    segments = (b"\xc0", sof), (b"\xda", sos)
    return b"\xff\xd8" + b"".join(b"\xff" + m + struct.pack(">H", len(d) + 2) + d for m, d in segments) + b"\xff\xd9"


def tiff_header(w: int, h: int) -> bytes:
    """A little-endian TIFF whose one directory declares an 8-bit gray w x h image in one strip."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1), (278, 4, h)]
    tags.append((279, 4, 1))
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0\0\0\0"


def webp_header(w: int, h: int) -> bytes:
    """The test picture as a lossless WebP whose bitstream header says w x h (libwebp takes the size
    from there, and refuses a header without a bitstream before any size is known)."""
    data = bytearray(saved("WEBP", lossless=True))
    at = data.index(b"VP8L") + 9  # past the chunk header and the 0x2f signature: 14 + 14 bits of size
    bits = struct.unpack("<I", data[at : at + 4])[0] & ~((1 << 28) - 1)
    data[at : at + 4] = struct.pack("<I", bits | (w - 1) | (h - 1) << 14)
    return bytes(data)


def saved(fmt: str, **kw) -> bytes:
    """The test picture (64x48) as Pillow writes it in `fmt` (a 3-frame animation for GIF save_all)."""
    buf = io.BytesIO()
    if kw.get("save_all"):
        kw["append_images"] = [picture(64, 48, seed=s) for s in (2, 3)]
    picture(64, 48, seed=1).save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_bytes(n: int) -> bytes:
    return np.random.default_rng([SEED, n]).bytes(n)


def cut(data: bytes, at: float | int) -> bytes:
    """The first `at` bytes (an int), or that fraction of them."""
    return data[: at if isinstance(at, int) else int(len(data) * at)]


def video(tmp: Path, name: str, **kw) -> bytes:
    """3 s at 10 fps, 64x48 unless `size` (sampled at 5 fps: 15 frames); made once per name."""
    path = tmp / name
    if not path.exists():
        make_video(path, 30, 10, **kw)
    return path.read_bytes()


def audio_mp4(tmp: Path) -> bytes:
    """An MP4 with one AAC audio stream and no video."""
    path = tmp / "audio-only.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\n0 0 moveto 64 48 lineto stroke\nshowpage\n"
TEXT = b"Shopping list: eggs, flour, milk.\nRemember the projector for Tuesday.\n"


@dataclass(frozen=True)
class Case:
    """One input. `name`: the file's name, whose extension tells the engine and the CLI image or
    video (the page tells by content). `kind`: how an API request sends it (image_url or
    video_url), and whether `Video(bytes)` is tried. `answers`: the doors where it is valid after
    all. `needle`: in every error message. `limit`: the Limits field it exceeds (the engine's
    `.limit`, the page's and the server's flag). `limits`: Limits fields for the page, the server and
    `Video(bytes, limits=Limits(...).video())`, which `held` asks for with the defaults.
    `header_only`: refused from its header, so nothing may be decoded."""

    id: str
    name: str
    make: Callable[[Path], bytes]
    kind: str = "image"
    routes: tuple[str, ...] | None = None
    answers: tuple[str, ...] = ()
    needle: str = ""
    limit: str | None = None
    limits: dict = field(default_factory=dict)
    held: bool = False
    header_only: bool = False

    def doors(self) -> tuple[str, ...]:
        return self.routes or (VIDEO_DOORS if self.kind == "video" else IMAGE_DOORS)

    def video_limits(self) -> VideoLimits | None:
        return Limits(**self.limits).video() if self.limits or self.held else None


UNSUPPORTED = "not an image in a supported format"
TOO_BIG = "exceeds the limit"
HUGE = 100_000
SIZES = (1, 1000, 100_000)  # random bytes
IMAGES = (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp"))
HEADERS = (
    ("PNG", "png", png_bytes, HUGE, HUGE),
    ("GIF", "gif", gif_header, 65535, 65535),
    ("BMP", "bmp", bmp_header, HUGE, HUGE),
    ("JPEG", "jpg", jpeg_header, 65500, 65500),
    ("TIFF", "tif", tiff_header, HUGE, HUGE),
    ("WebP", "webp", webp_header, 16384, 16384),
)
CASES: list[Case] = [
    # the controls: valid files, answered everywhere (the worker's baseline is taken after them)
    Case("valid PNG", "photo.png", lambda t: saved("PNG"), answers=IMAGE_DOORS),
    Case("valid MP4", "clip.mp4", lambda t: video(t, "clip.mp4"), "video", answers=VIDEO_DOORS),
    # random bytes, empty files
    *(Case(f"random bytes ({n:,} B) as image", "random.png", lambda t, n=n: random_bytes(n)) for n in SIZES),
    *(Case(f"random bytes ({n:,} B) as video", "random.mp4", lambda t, n=n: random_bytes(n), "video") for n in SIZES),
    Case("empty file as image", "empty.png", lambda t: b""),
    Case("empty file as video", "empty.mp4", lambda t: b"", "video", needle="empty"),
    # truncated files: inside the header, and half of the file
    *(
        Case(f"truncated {fmt} ({how})", f"cut.{ext}", lambda t, f=fmt, a=at: cut(saved(f), a))
        for fmt, ext in IMAGES
        for how, at in (("header", 20), ("half", 0.5))
    ),
    Case("truncated MP4 (header)", "cut.mp4", lambda t: cut(video(t, "v.mp4"), 100), "video"),
    Case("truncated MP4 (half)", "cut.mp4", lambda t: cut(video(t, "v.mp4"), 0.5), "video"),  # its index is at the end
    Case("truncated MKV (header)", "cut.mkv", lambda t: cut(video(t, "v.mkv"), 100), "video"),
    # Matroska is streamable: its first half is a shorter, valid video
    Case("truncated MKV (half)", "cut.mkv", lambda t: cut(video(t, "v.mkv"), 0.5), "video", answers=VIDEO_DOORS),
    # extensions that lie (the page tells a file by content)
    Case("PNG named .mp4", "photo.mp4", lambda t: saved("PNG"), "video", answers=("page",)),
    Case("MP4 named .png", "clip.png", lambda t: video(t, "clip.mp4"), answers=("page",)),
    Case("text named .jpg", "notes.jpg", lambda t: TEXT, needle=UNSUPPORTED),
    Case("text named .mp4", "notes.mp4", lambda t: TEXT, "video"),
    # formats outside the allowlist: Pillow reads them all, none may reach its plugin
    Case("PPM", "picture.ppm", lambda t: saved("PPM"), needle=UNSUPPORTED),
    Case("ICO", "favicon.ico", lambda t: saved("ICO"), needle=UNSUPPORTED),
    Case("TGA", "picture.tga", lambda t: saved("TGA")),  # no MIME type: the engine asks PyAV, a still image
    Case("EPS named .png", "drawing.png", lambda t: EPS, needle=UNSUPPORTED),
    # huge declared dimensions: a header of a few bytes, refused before anything is decoded
    *(
        Case(f"{fmt} header {w}x{h}", f"huge.{ext}", lambda t, m=m, w=w, h=h: m(w, h), needle=TOO_BIG,
             limit="max_image_pixels", header_only=True)
        for fmt, ext, m, w, h in HEADERS
    ),  # fmt: skip
    Case("PNG header 0x0", "zero.png", lambda t: png_bytes(0, 0), header_only=True),
    Case("PNG header 1x200000", "strip.png", lambda t: png_bytes(1, 200_000), needle="aspect ratio", header_only=True),
    # decompression bombs: pixel rows that inflate 500-fold (16000-fold as RGB); a text chunk 1000-fold
    Case("PNG bomb 12000x12000 (1-bit, 33 kB)", "bomb.png", lambda t: png_bomb(12_000), needle=TOO_BIG,
         limit="max_image_pixels", header_only=True),  # fmt: skip
    Case("PNG zTXt bomb (64 MB of text)", "text-bomb.png", lambda t: text_chunk_bomb(), needle="too large"),
    # 100 MP is the engine's own bound, so it is decoded: the memory bound's real test (uploads: 40 MP)
    Case("PNG bomb 10000x10000 (1-bit, 25 kB)", "bomb-100mp.png", lambda t: png_bomb(10_000),
         routes=("chat-path", "page", "server"), answers=("chat-path",), limit="max_image_pixels"),  # fmt: skip
    # no extension: the engine and the CLI ask Pillow, then PyAV, what the file is
    Case("PNG zTXt bomb, no extension", "text-bomb", lambda t: text_chunk_bomb(), needle="too large"),
    Case("PNG header 9500x9500, no extension", "big-header", lambda t: png_bytes(9500, 9500)),
    Case("truncated TIFF (header), no extension", "cut-tiff", lambda t: cut(saved("TIFF"), 20)),
    # beyond the upload limits (the operator's own files are not held to them)
    Case("upload over max_upload_mb", "big.png", lambda t: random_bytes(100_000), routes=("page", "server"),
         limit="max_upload_mb", limits={"max_upload_mb": 0.05}),
    Case("video frames over max_video_pixels", "vga.mp4", lambda t: video(t, "vga.mp4", size=(640, 480)), "video",
         UPLOADS, limit="max_video_pixels", limits={"max_video_pixels": 200_000}),
    Case("video longer than max_video_seconds", "long.mp4", lambda t: video(t, "clip.mp4"), "video", UPLOADS,
         limit="max_video_seconds", limits={"max_video_seconds": 1}),
    Case("video sampling more than max_video_frames", "many.mp4", lambda t: video(t, "clip.mp4"), "video", UPLOADS,
         limit="max_video_frames", limits={"max_video_frames": 4}),
    Case("video codec outside the allowlist (FFV1)", "ffv1.mkv", lambda t: video(t, "ffv1.mkv", codec="ffv1"),
         "video", UPLOADS, needle="video codec ffv1 is not one of", held=True),
    # not a video at all
    Case("WAV audio", "audio.wav", lambda t: make_wav(t / "audio.wav").read_bytes(), "video"),
    Case("audio-only MP4", "audio.mp4", audio_mp4, "video", needle="no video stream"),
    # an image everywhere but where a request says video_url (a container outside the allowlist);
    # Video(bytes) without limits is the caller's own file, which PyAV reads as a 3-frame video
    Case("animated GIF as video", "anim.gif", lambda t: saved("GIF", save_all=True, duration=100), "video",
         answers=("chat-path", "chat-video-bytes", "cli", "page")),
]  # fmt: skip
CONTROLS = 2
PAIRS = [(case, door) for case in CASES for door in case.doors()]
assert len({c.id for c in CASES}) == len(CASES)


def case_id(case: Case, door: str) -> str:
    return f"{door}: {case.id}"


def case_path(work: Path, case: Case) -> Path:
    """Each case in a folder of its own, so that its file's name is exactly `case.name`."""
    return work / f"case-{CASES.index(case):02d}" / case.name


def write_cases(work: Path) -> None:
    scratch = work / "scratch"
    scratch.mkdir()
    for case in CASES:
        path = case_path(work, case)
        path.parent.mkdir()
        path.write_bytes(case.make(scratch))


# --------------------------------------------------------------------------- the worker


class Watch:
    """What one case made Pillow's other plugins, Ghostscript and the decoders do."""

    def __init__(self) -> None:
        from PIL import EpsImagePlugin, ImageFile

        from minicpmv.runtime import video as video_module
        from minicpmv.runtime.image import IMAGE_FORMATS

        self.reset()
        Image.init()  # every plugin registered now, so none registers again over the spies below
        for fmt, (factory, accept) in list(Image.OPEN.items()):
            if fmt not in IMAGE_FORMATS:
                Image.OPEN[fmt] = (self._spy(fmt, factory), accept and self._spy(f"{fmt} probe", accept))
        EpsImagePlugin.Ghostscript = self._spy("Ghostscript", EpsImagePlugin.Ghostscript)
        EpsImagePlugin.has_ghostscript = self._spy("has_ghostscript", EpsImagePlugin.has_ghostscript)

        load = ImageFile.ImageFile.load

        def spy_load(im, *a, **k):
            if im.tile:  # pixel data left to decode
                self.images.append(f"{im.format} {im.size[0]}x{im.size[1]}")
            return load(im, *a, **k)

        ImageFile.ImageFile.load = spy_load
        decode = video_module.decode_sampled

        def spy_decode(*a, **k):
            self.videos += 1
            return decode(*a, **k)

        video_module.decode_sampled = spy_decode

    def _spy(self, what: str, fn: Callable) -> Callable:
        def spy(*a, **k):
            self.foreign.append(what)
            return fn(*a, **k)

        return spy

    def reset(self) -> None:
        self.foreign: list[str] = []
        self.images: list[str] = []
        self.videos = 0

    def report(self, caught: list) -> dict:
        hidden = (DeprecationWarning, PendingDeprecationWarning, ResourceWarning)  # not shown by default
        shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, hidden)]
        return {"foreign": self.foreign, "decoded": self.images, "videos": self.videos, "warnings": shown}


def raised(e: BaseException) -> dict:
    return {
        "outcome": "raised",
        "type": type(e).__name__,
        "value_error": isinstance(e, ValueError),
        "message": str(e),
        "limit": getattr(e, "limit", None),
        "traceback": traceback.format_exc(),
    }


def cli_args(lm: str, mm: str, path: Path) -> list:
    options = ["--max-tokens", "2", "--greedy", "--threads", "1", "--vision-dtype", "f32"]
    return ["--model", lm, "--mmproj", mm, path, QUESTION, *options]


class Doors:
    """The ways in; each returns what came out as a JSON-able dict."""

    def __init__(self, model, lm: str, mm: str) -> None:
        self.model, self.lm, self.mm = model, lm, mm

    def _chat(self, item) -> dict:
        try:
            answer = self.model.chat([{"role": "user", "content": [item, QUESTION]}], max_new_tokens=2, greedy=True)
        except Exception as e:  # noqa: BLE001 (whatever it is, the test judges it)
            return raised(e)
        return {"outcome": "answer", "message": str(answer)}

    def chat_path(self, case: Case, path: Path) -> dict:
        return self._chat(path)

    def chat_video_bytes(self, case: Case, path: Path) -> dict:
        from minicpmv.runtime.video import Video

        return self._chat(Video(path.read_bytes(), limits=case.video_limits(), name=case.name))

    def cli(self, case: Case, path: Path) -> dict:
        res = run_in_process("minicpm-run", *cli_args(self.lm, self.mm, path))
        exc = None if isinstance(res.exception, (SystemExit, type(None))) else res.exception
        return {
            "outcome": "answer" if res.exit_code == 0 else "exit",
            "exit": res.exit_code,
            "stdout": res.stdout,
            "stderr": res.stderr,
            "message": res.stderr.strip(),
            "traceback": None if exc is None else "".join(traceback.format_exception(exc)),
        }

    def page(self, case: Case, path: Path) -> dict:
        from minicpmv.cli.web_chat import LocalChat, Session
        from minicpmv.session.options import ChatOptions, MediaOptions

        opts = ChatOptions(max_tokens=2, greedy=True)
        chat, s = LocalChat(self.model, opts, MediaOptions(), Limits(**case.limits)), Session()
        try:
            if not chat.ask(s, QUESTION, [str(path)]):
                return {"outcome": "refused", "message": s.error, "msgs": len(s.conv.msgs), "turns": len(s.turns)}
            list(chat.answer(s, opts))
        except Exception as e:  # noqa: BLE001
            return raised(e)
        done = not s.error and s.turns and s.turns[-1].done
        return {"outcome": "answer" if done else "refused", "message": s.error or s.turns[-1].answer}

    def server(self, case: Case, path: Path) -> dict:
        from minicpmv.server.errors import APIError
        from minicpmv.server.media import MediaLoader
        from minicpmv.session.options import MediaOptions

        param = f"messages[0].content[0].{case.kind}_url"
        uri = "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()
        loader = MediaLoader(Limits(**case.limits))
        try:
            data = loader.from_url(uri, param)
            item = loader.image(data, param) if case.kind == "image" else loader.video(data, MediaOptions(), param)
        except APIError as e:
            return {"outcome": "refused", "status": e.status, "message": e.message, "param": e.param}
        except Exception as e:  # noqa: BLE001
            return raised(e)
        return {"outcome": "answer", "message": type(item).__name__}


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(work: Path, lm: str, mm: str) -> None:
    """Every case through each of its doors, a JSON line each into work/results.jsonl after a line
    {"started": id}, so that a hang or a crash names its case."""
    from minicpmv.runtime import MiniCPMV

    faulthandler.enable()
    watch = Watch()
    model = MiniCPMV.load(lm, mm, n_threads=1, vision_dtype="f32")
    doors = Doors(model, lm, mm)
    with open(work / "results.jsonl", "w") as out:

        def emit(d: dict) -> None:
            out.write(json.dumps(d) + "\n")
            out.flush()

        for i, case in enumerate(CASES):
            if i == CONTROLS:  # the valid files went through every door: all code paths warm
                emit({"baseline": max_rss()})
            for door in case.doors():
                emit({"started": case_id(case, door)})
                watch.reset()
                t0 = time.perf_counter()
                faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        res = getattr(doors, door.replace("-", "_"))(case, case_path(work, case))
                finally:
                    faulthandler.cancel_dump_traceback_later()
                seconds = time.perf_counter() - t0
                emit({"id": case_id(case, door), **res, **watch.report(caught), "seconds": seconds, "rss": max_rss()})
    model.close()


# --------------------------------------------------------------------------- the tests


@dataclass
class Run:
    work: Path
    results: dict[str, dict]
    started: list[str]
    baseline: int
    returncode: int | None  # None: the worker timed out
    stderr: str
    seconds: float

    def why(self) -> str:
        last = self.started[-1] if self.started else "(before the first case)"
        return f"the worker ended with {self.returncode} during {last!r}: {self.stderr[-3000:]}"

    def result(self, case: Case, door: str) -> dict:
        if case_id(case, door) not in self.results:
            pytest.fail(f"no result: {self.why()}")
        return self.results[case_id(case, door)]


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> Run:
    """All the in-process cases, in the worker."""
    work = tmp_path_factory.mktemp("fuzz-media")
    write_cases(work)
    cmd = [sys.executable, "-m", "tests.test_fuzz_media", str(work), *map(str, files)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode, stderr = None, (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - t0
    log = work / "results.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    baseline = next((x["baseline"] for x in lines if "baseline" in x), 0)
    started = [x["started"] for x in lines if "started" in x]
    return Run(work, {x["id"]: x for x in lines if "id" in x}, started, baseline, returncode, stderr, seconds)


def one_line(msg: str, where: str) -> str:
    assert msg and "\n" not in msg and msg == msg.strip(), f"{where}: not one line"
    return msg


# the engine's name (ImageError/VideoError .limit) of each Limits field
ENGINE_LIMIT = {
    "max_image_pixels": "max_image_pixels",
    "max_video_pixels": "max_pixels",
    "max_video_seconds": "max_seconds",
    "max_video_frames": "max_frames",
}
ENGINE_ERRORS = ("ImageError", "VideoError", "PromptError")  # ValueErrors with one-line messages


@pytest.mark.parametrize(("case", "door"), PAIRS, ids=[case_id(c, d) for c, d in PAIRS])
def test_media(run: Run, case: Case, door: str) -> None:
    res = run.result(case, door)
    path = case_path(run.work, case)
    where = f"{case_id(case, door)}: {res.get('message')!r}"
    if res.get("traceback") and not (door.startswith("chat") and res["type"] in ENGINE_ERRORS):
        pytest.fail(f"{where}: an exception got out\n{res['traceback']}")
    assert not res["foreign"], f"{where}: Pillow code outside IMAGE_FORMATS ran: {res['foreign']}"
    assert not res["warnings"], f"{where}: warnings reach stderr: {res['warnings']}"
    if case.header_only:
        assert not res["decoded"], f"{where}: {res['decoded']} decoded before it was refused"
    if case.limits or case.held:
        assert res["videos"] == 0, f"{where}: frames decoded before the limit refused it"

    if door in case.answers:
        assert res["outcome"] == "answer", where
        if door == "cli":
            assert res["exit"] == 0 and res["stderr"] == "" and res["stdout"].strip(), where
        return

    if door == "cli":  # exit 2, one line naming the file, nothing on stdout
        line = one_error_line(
            SimpleNamespace(exit_code=res["exit"], stderr=res["stderr"]), str(path), prog="minicpm-run"
        )
        msg = line.split(": error: ", 1)[1]
        assert res["stdout"] == "", where
    elif door.startswith("chat"):  # a ValueError naming the file (the path, or the Video's name)
        assert res["outcome"] == "raised" and res["value_error"], where
        msg = one_line(res["message"], where)
        assert (str(path) if door == "chat-path" else case.name) in msg, f"{where}: the file is not named"
        if case.limit:
            assert res["limit"] == ENGINE_LIMIT[case.limit], where
    else:
        assert res["outcome"] == "refused", where
        msg = one_line(res["message"], where)
        if door == "page":  # named by its own name, not the temporary path; nothing queued
            assert path.name in msg and str(path.parent) not in msg, where
            assert res["msgs"] == res["turns"] == 0, where
        else:
            assert res["status"] == (413 if case.limit == "max_upload_mb" else 400), where
            assert msg.startswith(f"{res['param']}: "), where
        if case.limit:
            assert f"({FLAGS[case.limit]})" in msg, f"{where}: the flag is not named"
    assert case.needle in msg, where


def test_every_case_ran_in_time(run: Run) -> None:
    """The worker went through every case, none near its time bound. `pytest -s` prints the table
    of outcomes kept in docs/malformed-files.md §4."""
    assert run.returncode == 0, run.why()
    assert len(run.results) == len(PAIRS), run.why()
    slowest = sorted(run.results.values(), key=lambda r: r["seconds"], reverse=True)
    print(
        f"\nworker {run.seconds:.1f} s; slowest: " + ", ".join(f"{r['id']} {r['seconds']:.2f} s" for r in slowest[:3])
    )
    assert slowest[0]["seconds"] < CASE_TIMEOUT_S / 2, slowest[0]["id"]
    print(table(run))


def table(run: Run) -> str:
    doors = VIDEO_DOORS
    rows = [f"| input | {' | '.join(doors)} | first message |", "|---" * (len(doors) + 2) + "|"]
    for case in CASES:
        cells, first = [], ""
        for door in doors:
            res = run.results.get(case_id(case, door))
            cells.append("" if res is None else "answer" if res["outcome"] == "answer" else "error")
            if res is not None and res["outcome"] != "answer" and not first:
                first = res["message"].split(": error: ", 1)[-1].replace(f"{case_path(run.work, case).parent}/", "")
        rows.append(f"| {case.id} | {' | '.join(cells)} | {first[:110]} |")
    return "\n".join(rows)


def test_memory(run: Run) -> None:
    """The worker's peak RSS stays within 1 GB of where it stood after the valid files (the 100 MP
    bomb, decoded at the engine's own bound, is the most)."""
    assert run.baseline, run.why()
    ordered = list(run.results.values())
    peak = max(r["rss"] for r in ordered)
    steps = sorted(((b["rss"] - a["rss"], b["id"]) for a, b in zip(ordered, ordered[1:])), reverse=True)
    print(
        f"\npeak RSS {peak / 2**20:.0f} MiB, {(peak - run.baseline) / 2**20:.0f} MiB over the baseline; raised most by "
        + ", ".join(f"{cid} (+{d / 2**20:.0f} MiB)" for d, cid in steps[:3])
    )
    assert peak - run.baseline < MEMORY_BOUND, steps[:3]


SUBPROCESS = [
    "random bytes (1,000 B) as video",
    "truncated JPEG (half)",
    "EPS named .png",
    "PNG header 100000x100000",
    "PNG zTXt bomb, no extension",
    "WAV audio",
]


@pytest.mark.parametrize("cid", SUBPROCESS)
def test_real_command(run: Run, files, cid: str) -> None:
    """The real `minicpm-run`, a process each: exactly what the in-process run printed."""
    case = next(c for c in CASES if c.id == cid)
    path = case_path(run.work, case)
    res = run_cli("minicpm-run", *cli_args(*map(str, files), path), timeout=CASE_TIMEOUT_S)
    one_error_line(res, str(path), prog="minicpm-run")
    want = run.result(case, "cli")
    assert (res.stdout, res.stderr) == (want["stdout"], want["stderr"])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
