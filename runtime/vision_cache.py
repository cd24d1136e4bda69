"""Vision embeddings of a prompt's media: content keys, an LRU cache bounded in bytes, and batched
encoding of what the cache does not hold.

A media item (an image, or a temporal group of video frames) is keyed by its pixels, its temporal
ids and the slicing it was prepared for, so a conversation that shows the same picture again (or
every turn after the first: the reference re-renders the whole history) encodes it once.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Iterator

import numpy as np
from PIL import Image

from .image import slice_image
from .prompt import Media
from .results import ChatStats

KEY_BAND_BYTES = 16 << 20  # pixels hashed at a time by image_key
VISION_BATCH_SLICES = 48  # slices (frames x slots) per vision call: normalized pixels are 2.4 MB each


class SlicingMismatchError(RuntimeError):
    """Slicing an image gave a different number of slots than its placeholder has (a bug)."""


def image_key(img: Image.Image) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    # band by band: tobytes() of a whole 100 MP image would hold 300 MB twice (its chunks and their
    # join) next to the image's own 400 MB; the same bytes hash to the same key
    w, height = img.size
    rows = max(1, KEY_BAND_BYTES // max(1, w * 4))
    for top in range(0, height, rows):
        h.update(img.crop((0, top, w, min(height, top + rows))).tobytes())
    return h.digest()


def media_key(m: Media, max_slice_nums: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{max_slice_nums}|{m.temporal_ids}|".encode())
    for f in m.frames:
        h.update(image_key(f))
    return h.digest()


class EmbeddingCache:
    """media key -> [n_slots, query_num, n_embd] float32, least recently used dropped first."""

    def __init__(self, vision, max_bytes: int = 1 << 30):
        self.vision = vision
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def items(self) -> Iterator[tuple[bytes, np.ndarray]]:
        return iter(self._entries.items())

    def add(self, key: bytes, emb: np.ndarray) -> None:
        """Hold embeddings computed elsewhere (the same media key, mmproj and encoder dtype)."""
        self._remember(key, np.ascontiguousarray(emb, dtype=np.float32))

    def embeddings(
        self, wanted: dict[bytes, Media], max_slice_nums: int, stats: ChatStats, progress: bool = False
    ) -> dict[bytes, np.ndarray]:
        """Embeddings of every media item of `wanted`: cached ones as they are, the others encoded in
        bounded batches (all slots of an item in one vision call) and remembered."""
        out: dict[bytes, np.ndarray] = {}
        todo: list[tuple[bytes, Media]] = []
        for k, m in wanted.items():
            if k in self._entries:
                self._entries.move_to_end(k)
                out[k] = self._entries[k]
            else:
                todo.append((k, m))
        batch: list[tuple[bytes, Media]] = []
        for i, (k, m) in enumerate(todo):
            batch.append((k, m))
            if sum(len(b.frames) * b.n_slots for _, b in batch) >= VISION_BATCH_SLICES or i == len(todo) - 1:
                for (bk, _), e in zip(batch, self._encode([b for _, b in batch], max_slice_nums, stats, progress)):
                    out[bk] = e
                    self._remember(bk, e)
                batch = []
        return out

    def _encode(self, todo: list[Media], max_slice_nums: int, stats: ChatStats, progress: bool) -> list[np.ndarray]:
        """[n_slots, query_num, n_embd] per media item, all items in one vision call (the encoder
        batches slices up to its token budget). Slot g of a temporal group is the g-th slice of
        every frame of the group, attended jointly; a still image's slots are groups [-1] (no
        temporal term), exactly as the reference without temporal_ids."""
        pixels: list[np.ndarray] = []
        groups: list[list[int]] = []
        for m in todo:
            sliced = [slice_image(f, max_slice_nums) for f in m.frames]
            if len(sliced[0].images) != m.n_slots:
                raise SlicingMismatchError(f"slicing gave {len(sliced[0].images)} slots, the placeholder {m.n_slots}")
            per_frame = [s.pixel_values() for s in sliced]
            for g in range(m.n_slots):
                pixels += [pf[g] for pf in per_frame]
                groups.append(list(m.temporal_ids) if m.temporal_ids is not None else [-1])
        t0 = time.perf_counter()
        emb = np.asarray(
            self.vision.encode_slices(pixels, groups, progress=progress and len(groups) > 8), dtype=np.float32
        )
        ms = (time.perf_counter() - t0) * 1e3
        stats.images_encoded += len(todo)
        stats.slots_encoded += len(groups)
        stats.vision_ms += [ms / len(groups)] * len(groups)
        out, k = [], 0
        for m in todo:
            out.append(np.ascontiguousarray(emb[k : k + m.n_slots]))
            k += m.n_slots
        return out

    def _remember(self, key: bytes, emb: np.ndarray) -> None:
        self._entries[key] = emb
        total = sum(e.nbytes for e in self._entries.values())
        while total > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= old.nbytes
