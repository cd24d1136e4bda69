"""Decoding a video with PyAV: one demux pass to count and index the packets (no decoding), then
only the GOPs that hold sampled frames are decoded, and only the sampled frames become RGB images.
A video from the network is held to VideoLimits before any frame is decoded: the container is
told by its first bytes and only its demuxer runs, the codec and frame size are checked from the
stream's header, the duration and frame count from the packet index."""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .video_sampling import VideoError, VideoPlan

# What a network front end accepts (VideoLimits.checked): FFmpeg's demuxer for the container, told by
# the file's first bytes (so no other demuxer ever sees the data), and the stream's codec.
CONTAINER_MAGIC = {"mp4": "MP4/MOV", "matroska": "WebM/Matroska", "avi": "AVI"}
VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4"})


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on what decoding a video may cost, checked before any frame is decoded (the
    container and codec, the frame size) or before the sampled frames are (the duration and how
    many frames are kept). None: no bound. `checked` restricts the container to CONTAINER_MAGIC,
    told by content, and the codec to VIDEO_CODECS."""

    max_seconds: float | None = None
    max_frames: int | None = None  # distinct sampled frames kept as RGB images
    max_pixels: int | None = None  # width x height of a frame
    checked: bool = False


def sniff_container(head: bytes) -> str | None:
    """FFmpeg's demuxer name for a supported container, from a file's first 12 bytes."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


@dataclass
class PacketIndex:
    """What one demux pass (no decoding) tells us about the video stream."""

    n_frames: int
    sorted_pts: list[int] | None  # None: some packet has no pts -> count decoded frames instead
    keyframe_ranks: list[int]  # presentation-order numbers of keyframes, sorted

    def rank(self, pts: int | None) -> int | None:
        if pts is None or self.sorted_pts is None:
            return None
        i = bisect.bisect_left(self.sorted_pts, pts)
        if i < len(self.sorted_pts) and self.sorted_pts[i] == pts:
            return i
        if i == 0:
            return 0
        if i == len(self.sorted_pts):
            return i - 1
        return i if self.sorted_pts[i] - pts < pts - self.sorted_pts[i - 1] else i - 1

    def keyframe_before(self, rank: int) -> int:
        """Latest keyframe at or before `rank`, -1 when there is none (decode from the start)."""
        i = bisect.bisect_right(self.keyframe_ranks, rank)
        return self.keyframe_ranks[i - 1] if i else -1


class VideoSource:
    """Where a video's bytes come from (a path, or bytes in memory), its name in messages, and the
    limits its decoding is held to. Each `open()` is a fresh PyAV container."""

    def __init__(self, source: str | Path | bytes, name: str | None, limits: VideoLimits):
        self.limits = limits
        self.data: bytes | None = None
        self.path: Path | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data = bytes(source)
            self.name = name or "<video bytes>"
            if not self.data:
                raise VideoError(f"{self.name}: empty, not a video")
            head = self.data[:12]
        else:
            self.path = Path(source)
            self.name = name or str(source)
            if not self.path.exists():
                raise VideoError(f"{self.name}: video file not found")
            if not self.path.is_file():
                raise VideoError(f"{self.name}: not a file")
            if self.path.stat().st_size == 0:
                raise VideoError(f"{self.name}: empty file, not a video")
            with open(self.path, "rb") as f:
                head = f.read(12)
        self.format = sniff_container(head) if limits.checked else None
        if limits.checked and self.format is None:
            raise VideoError(
                f"{self.name}: not a video in a supported container ({', '.join(CONTAINER_MAGIC.values())})"
            )

    def open(self):
        import av

        target = io.BytesIO(self.data) if self.data is not None else str(self.path)
        try:
            return av.open(target, format=self.format, metadata_errors="ignore")
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
            raise VideoError(f"{self.name}: cannot open as a video ({_reason(e)})") from None

    def check_stream(self, container, stream) -> None:
        lim = self.limits
        if lim.checked:
            codec = stream.codec_context.codec
            name = getattr(codec, "canonical_name", None) or codec.name
            if name not in VIDEO_CODECS:
                raise VideoError(f"{self.name}: video codec {name} is not one of {', '.join(sorted(VIDEO_CODECS))}")
        w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
        if lim.max_pixels is not None and w * h > lim.max_pixels:
            raise VideoError(
                f"{self.name}: frames of {w}x{h} exceed the limit of {lim.max_pixels / 1e6:.1f} MP", limit="max_pixels"
            )
        if lim.max_seconds is not None and container.duration and container.duration / 1e6 > lim.max_seconds:
            raise VideoError(
                f"{self.name}: {container.duration / 1e6:.0f} s long, more than the limit of {lim.max_seconds:.0f} s",
                limit="max_seconds",
            )

    def check_plan(self, plan: VideoPlan) -> None:
        lim = self.limits
        if lim.max_seconds is not None and plan.duration > lim.max_seconds:
            raise VideoError(
                f"{self.name}: {plan.duration:.0f} s long, more than the limit of {lim.max_seconds:.0f} s",
                limit="max_seconds",
            )
        n = len(set(plan.frame_indices))
        if lim.max_frames is not None and n > lim.max_frames:
            raise VideoError(
                f"{self.name}: sampling it takes {n} frames, more than the limit of {lim.max_frames} "
                "(sample fewer: fps, max_frames)",
                limit="max_frames",
            )


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())


def _video_stream(container, src: VideoSource):
    path = src.name
    fmt = container.format.name
    if fmt == "tty":  # ffmpeg renders .txt/.nfo... files as ANSI-art "video"
        raise VideoError(f"{path}: is a text file, not a video")
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise VideoError(f"{path}: is a still image ({fmt}), not a video")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError(f"{path}: no decoder for its video codec")
    src.check_stream(container, stream)
    return stream


def _scan_packets(container, stream, src: VideoSource) -> PacketIndex:
    import av

    path = src.name
    pts, keyframes = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # end-of-stream marker
                continue
            pts.append(packet.pts)
            keyframes.append(packet.is_keyframe)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: corrupt video ({_reason(e)})") from None
    if not pts:
        raise VideoError(f"{path}: video stream has no frames")
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        return PacketIndex(len(pts), None, [])
    sorted_pts = sorted(pts)
    rank = {p: i for i, p in enumerate(sorted_pts)}
    return PacketIndex(len(pts), sorted_pts, sorted(rank[p] for p, k in zip(pts, keyframes) if k))


def _average_fps(container, stream, n_frames: int, src: VideoSource) -> float:
    path = src.name
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and float(rate) > 0:
            return float(rate)
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    if seconds and seconds > 0:
        return n_frames / seconds
    raise VideoError(f"{path}: cannot determine the video frame rate")


def decode_sampled(
    src: VideoSource, index: PacketIndex, targets: list[int], progress: bool
) -> tuple[dict[int, Image.Image], int]:
    """Decode frames `targets` (sorted, distinct presentation-order numbers) of the first video stream.

    Packets are read in file order; between sampled frames, packets are not even sent to the
    decoder until the keyframe that starts the GOP of the next sampled frame (the decoder is
    flushed there), so only the GOPs holding sampled frames are decoded and only sampled frames
    are converted to RGB and kept. Without usable pts every frame is decoded and counted.
    """
    import av
    from tqdm import tqdm

    images: dict[int, Image.Image] = {}
    n_decoded, next_t, counter = 0, 0, 0
    path = src.name
    bar = tqdm(total=len(targets), desc=f"decoding {Path(path).name}", unit="frame", disable=not progress, leave=False)

    def take(frames) -> None:
        nonlocal n_decoded, next_t, counter
        for frame in frames:
            n_decoded += 1
            rank = index.rank(frame.pts) if index.sorted_pts is not None else counter
            counter += 1
            if rank is None or next_t >= len(targets) or rank < targets[next_t]:
                continue
            image = frame.to_image()  # RGB
            # rank > target only if the decoder dropped the target frame: use the next one
            while next_t < len(targets) and targets[next_t] <= rank:
                images[targets[next_t]] = image
                next_t += 1
                bar.update(1)

    seek_ok = index.sorted_pts is not None
    with src.open() as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        codec = stream.codec_context
        feeding = not seek_ok
        need_key = index.keyframe_before(targets[0]) if seek_ok else -1
        fed_key = -1
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                rank = index.rank(packet.pts) if seek_ok else None
                if not feeding:
                    # restart at the keyframe opening the next sampled frame's GOP
                    if need_key >= 0 and not (packet.is_keyframe and need_key <= rank <= targets[next_t]):
                        continue
                    feeding = True
                if seek_ok and packet.is_keyframe:
                    fed_key = max(fed_key, rank)
                take(codec.decode(packet))
                if next_t == len(targets):
                    break
                if seek_ok:
                    key = index.keyframe_before(targets[next_t])
                    if key > fed_key:  # the next sampled frame is in a later GOP: skip to it
                        codec.flush_buffers()
                        feeding, need_key = False, key
            else:
                if feeding:
                    take(codec.decode(None))  # drain delayed frames
        except av.FFmpegError as e:
            raise VideoError(f"{path}: corrupt video, decoding failed ({_reason(e)})") from None
        finally:
            bar.close()
    if next_t < len(targets):
        raise VideoError(
            f"{path}: corrupt or truncated video, decoded {next_t} of {len(targets)} "
            f"sampled frames (frame {targets[next_t]} of {index.n_frames} missing)"
        )
    return images, n_decoded


def index_video(src: VideoSource) -> tuple[PacketIndex, float]:
    """(packet index, average fps) of the source's first video stream, its header checked against
    the source's limits; nothing is decoded."""
    with src.open() as container:
        stream = _video_stream(container, src)
        index = _scan_packets(container, stream, src)
        return index, _average_fps(container, stream, index.n_frames, src)
