"""Video input: the model card's `encode_video` frame sampling, and PyAV decoding of only those frames.

MiniCPM-V 4.5 packs up to `packing` consecutive frames into one resampler query (64 tokens per
group). The model card (docs/reference-model.md §7) picks the frames and their temporal ids like this:

    duration = n_frames / avg_fps
    if choose_fps * int(duration) <= MAX_NUM_FRAMES:   packing 1,
        n = round(min(choose_fps, round(avg_fps)) * min(MAX_NUM_FRAMES, duration))
    else: packing = ceil(duration * choose_fps / MAX_NUM_FRAMES)
        packing <= MAX_NUM_PACKING: n = round(duration * choose_fps)
        otherwise:                 n = MAX_NUM_FRAMES * MAX_NUM_PACKING, packing = MAX_NUM_PACKING
    frame i = int(i * gap + gap / 2), gap = n_frames / n          (uniform sampling)
    force_packing -> packing = min(force_packing, MAX_NUM_PACKING)
    temporal id = nearest value of arange(0, duration, 0.1) to index / avg_fps, / 0.1, int32
    groups = consecutive chunks of `packing` ids

`plan_video_sampling` is that algorithm as a pure function; `load_video` scans the packets of a
file (no decoding), plans, then decodes only the GOPs that hold sampled frames.
"""

from __future__ import annotations

import bisect
import math
import mimetypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_FPS = 5  # frames sampled per second: the model card's example (its encode_video default is 3)
MAX_NUM_FRAMES = 180  # frames after packing (= groups) in the model card
MAX_NUM_PACKING = 3  # model card default
PACKING_LIMIT = 6  # the model card's valid range for MAX_NUM_PACKING is 1..6
TIME_SCALE = 0.1  # temporal ids are in 0.1 s units

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .flv .f4v .wmv .asf .mpg .mpeg .m2v .vob .ts .mts .m2ts "
    ".3gp .3g2 .ogv .mxf .y4m .divx".split())
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .ico .jp2 .tga .heic .avif".split())


class VideoError(ValueError):
    """Bad video input or argument: the message is one line naming the file or argument."""


@dataclass(frozen=True)
class VideoPlan:
    frame_indices: list[int]  # sampled frame numbers in presentation order (may repeat for short videos)
    temporal_ids: list[int]  # one per sampled frame, 0.1 s units
    groups: list[list[int]]  # temporal ids chunked by `packing`: what chat(temporal_ids=...) takes
    packing: int
    duration: float  # seconds = n_frames_total / fps
    n_frames_total: int
    fps: float


@dataclass
class VideoFrames:
    frames: list[Image.Image]  # RGB, one per plan.frame_indices entry (repeated indices share one image)
    temporal_ids: list[list[int]]  # = plan.groups
    plan: VideoPlan
    n_decoded: int  # frames the decoder produced, including those decoded only to reach a sampled one


# ---------------------------------------------------------------- sampling (pure) ----

def plan_video_sampling(n_frames_total: int, avg_fps: float, choose_fps: float = DEFAULT_FPS,
                        force_packing: int | None = None, max_num_frames: int = MAX_NUM_FRAMES,
                        max_num_packing: int = MAX_NUM_PACKING) -> VideoPlan:
    """The model card's encode_video, minus the decoding. Python `round` (half to even) as there.

    One deviation: where the card would ask for 0 frames (a clip shorter than half a sample
    interval, or avg_fps < 0.5 so round(fps) == 0) it divides by zero; we take 1 frame.
    """
    if isinstance(n_frames_total, bool) or not isinstance(n_frames_total, (int, np.integer)) or n_frames_total < 1:
        raise VideoError(f"video has no frames (n_frames_total={n_frames_total!r})")
    if not (math.isfinite(avg_fps) and avg_fps > 0):
        raise VideoError(f"video frame rate must be a positive number, got {avg_fps!r}")
    if not (math.isfinite(choose_fps) and choose_fps > 0):
        raise VideoError(f"fps must be a positive number, got {choose_fps!r}")
    if int(max_num_frames) != max_num_frames or max_num_frames < 1:
        raise VideoError(f"max frames must be a positive integer, got {max_num_frames!r}")
    if int(max_num_packing) != max_num_packing or not 1 <= max_num_packing <= PACKING_LIMIT:
        raise VideoError(f"packing must be an integer in 1..{PACKING_LIMIT}, got {max_num_packing!r}")
    if force_packing is not None and (int(force_packing) != force_packing or force_packing < 0):
        raise VideoError(f"force_packing must be a non-negative integer, got {force_packing!r}")

    n_total, fps = int(n_frames_total), float(avg_fps)
    duration = n_total / fps
    if choose_fps * int(duration) <= max_num_frames:
        packing = 1
        n_sample = round(min(choose_fps, round(fps)) * min(max_num_frames, duration))
    else:
        packing = math.ceil(duration * choose_fps / max_num_frames)
        if packing <= max_num_packing:
            n_sample = round(duration * choose_fps)
        else:
            n_sample = round(max_num_frames * max_num_packing)
            packing = int(max_num_packing)
    n_sample = max(1, n_sample)

    gap = n_total / n_sample
    indices = [int(i * gap + gap / 2) for i in range(n_sample)]
    if force_packing:  # truthiness as in the card: 0 means "not forced"
        packing = min(int(force_packing), int(max_num_packing))

    timestamps = np.asarray(indices) / fps
    scale = np.arange(0, duration, TIME_SCALE)
    ids = (scale[nearest_scale_index(timestamps, scale)] / TIME_SCALE).astype(np.int32).tolist()
    groups = [ids[i:i + packing] for i in range(0, len(ids), packing)]
    return VideoPlan(indices, ids, groups, packing, duration, n_total, fps)


def nearest_scale_index(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Index of the nearest `scale` entry (sorted, distinct) for each value, as scipy's cKDTree.

    The card snaps with cKDTree(scale[:, None]).query. Away from ties that is plain nearest
    neighbour on squared distances. Exact ties (a timestamp at the midpoint of two grid values,
    e.g. frame k at 20/40/60 fps) are common, and cKDTree breaks them by its tree layout: the
    lower value wins when the two sit in different leaves, else whichever comes first inside
    the leaf. `_kdtree_leaf_layout` rebuilds that layout (verified against scipy in the tests).
    """
    values = np.asarray(values, dtype=np.float64)
    j = np.searchsorted(scale, values)
    lo = np.clip(j - 1, 0, len(scale) - 1)
    hi = np.clip(j, 0, len(scale) - 1)
    d_lo = np.abs(scale[lo] - values) ** 2  # same float ops as cKDTree's p=2 distance
    d_hi = np.abs(scale[hi] - values) ** 2
    out = np.where(d_hi < d_lo, hi, lo)
    ties = np.flatnonzero((d_hi == d_lo) & (hi != lo))
    if len(ties):
        leaf, slot = _kdtree_leaf_layout(len(scale))
        for t in ties:
            a, b = lo[t], hi[t]
            out[t] = b if leaf[a] == leaf[b] and slot[b] < slot[a] else a
    return out


_KDTREE_LEAFSIZE = 16  # cKDTree default


@lru_cache(maxsize=8)
def _kdtree_leaf_layout(n: int) -> tuple[list[int], list[int]]:
    """Leaf id and position inside the leaf of each point of cKDTree(sorted distinct 1-D data).

    cKDTree (balanced_tree=True) splits a node of more than 16 points at its median with
    std::nth_element over its index array and recurses on both halves; points are then scanned
    leaf by leaf in index-array order with a strict `<`, so the first of two equidistant points
    wins. For sorted data, comparing values is comparing indices. Linux wheels use libstdc++,
    whose nth_element is replicated in `_nth_element`.
    """
    order = list(range(n))
    leaf, slot = [0] * n, [0] * n
    stack = [(0, n)]
    while stack:
        start, end = stack.pop()
        if end - start <= _KDTREE_LEAFSIZE:
            for k in range(start, end):
                leaf[order[k]], slot[order[k]] = start, k
            continue
        mid = start + (end - start) // 2
        _nth_element(order, start, mid, end)
        stack += [(start, mid), (mid, end)]
    return leaf, slot


def _nth_element(a: list[int], first: int, nth: int, last: int) -> None:
    """libstdc++ std::nth_element (introselect: median-of-3 pivot, then insertion sort)."""
    depth = 2 * ((last - first).bit_length() - 1)
    while last - first > 3:
        if depth == 0:  # heap-select fallback; never reached for sorted input (checked to 400k points)
            raise RuntimeError("nth_element depth limit reached")
        depth -= 1
        x, y, z = first + 1, first + (last - first) // 2, last - 1
        if a[x] < a[y]:
            m = y if a[y] < a[z] else (z if a[x] < a[z] else x)
        else:
            m = x if a[x] < a[z] else (z if a[y] < a[z] else y)
        a[first], a[m] = a[m], a[first]
        pivot, lo, hi = a[first], first + 1, last
        while True:  # unguarded partition
            while a[lo] < pivot:
                lo += 1
            hi -= 1
            while pivot < a[hi]:
                hi -= 1
            if not lo < hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        if lo <= nth:
            first = lo
        else:
            last = lo
    for i in range(first + 1, last):  # insertion sort
        v = a[i]
        if v < a[first]:
            a[first + 1:i + 1] = a[first:i]
            a[first] = v
        else:
            k = i
            while v < a[k - 1]:
                a[k] = a[k - 1]
                k -= 1
            a[k] = v


# ---------------------------------------------------------------- decoding (PyAV) ----

@dataclass
class _PacketIndex:
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


def load_video(path: str | Path, fps: float = DEFAULT_FPS, packing: int | None = None, max_frames: int = MAX_NUM_FRAMES,
               progress: bool = False) -> VideoFrames:
    """Sample a video as the model card does and decode only the sampled frames.

    fps: frames per second to sample (the card's choose_fps). max_frames: MAX_NUM_FRAMES.
    packing: None -> the card's dynamic packing (at most 3 frames per group); N in 1..6 -> exactly
    N frames per group (force_packing = N) and up to max_frames * N frames for long videos
    (MAX_NUM_PACKING = N). packing=1 is one frame per image. N above the card's 3 is this project's
    extension (docs/architecture.md §4): the card as published caps packing at 3.

    The frame count is the number of video packets (what decord, used by the card, counts);
    the container's nb_frames is not used because it is 0 in e.g. mkv/webm and may be stale.
    avg fps is the stream's average rate (decord's get_avg_fps), else its guessed rate, else
    frames / stream duration.
    """
    path = Path(path)
    if packing is not None and (isinstance(packing, bool) or int(packing) != packing
                                or not 1 <= packing <= PACKING_LIMIT):
        raise VideoError(f"packing must be an integer in 1..{PACKING_LIMIT}, got {packing!r}")
    with _open(path) as container:
        stream = _video_stream(container, path)
        index = _scan_packets(container, stream, path)
        avg_fps = _average_fps(container, stream, index.n_frames, path)
    plan = plan_video_sampling(index.n_frames, avg_fps, choose_fps=fps, force_packing=packing,
                               max_num_frames=max_frames,
                               max_num_packing=MAX_NUM_PACKING if packing is None else packing)
    images, n_decoded = _decode_sampled(path, index, sorted(set(plan.frame_indices)), progress)
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
    try:  # anything Pillow reads is an image (PyAV would also open it as a 1-frame video)
        with Image.open(path):
            return False
    except Image.DecompressionBombError:
        return False    # a (huge) image
    except OSError:
        pass            # not an image Pillow knows (UnidentifiedImageError): ask PyAV
    import av
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video)
    except (av.FFmpegError, OSError, ValueError):
        return False


def _open(path: Path):
    import av
    if not path.exists():
        raise VideoError(f"{path}: video file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file, not a video")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: cannot open as a video ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())


def _video_stream(container, path: Path):
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
    return stream


def _scan_packets(container, stream, path: Path) -> _PacketIndex:
    import av
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
        return _PacketIndex(len(pts), None, [])
    sorted_pts = sorted(pts)
    rank = {p: i for i, p in enumerate(sorted_pts)}
    return _PacketIndex(len(pts), sorted_pts, sorted(rank[p] for p, k in zip(pts, keyframes) if k))


def _average_fps(container, stream, n_frames: int, path: Path) -> float:
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


def _decode_sampled(path: Path, index: _PacketIndex, targets: list[int],
                    progress: bool) -> tuple[dict[int, Image.Image], int]:
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
    bar = tqdm(total=len(targets), desc=f"decoding {path.name}", unit="frame", disable=not progress, leave=False)

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
    with _open(path) as container:
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
        raise VideoError(f"{path}: corrupt or truncated video, decoded {next_t} of {len(targets)} "
                         f"sampled frames (frame {targets[next_t]} of {index.n_frames} missing)")
    return images, n_decoded
