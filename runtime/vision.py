"""MiniCPM-V 4.5 vision path on the CPU in torch: SigLIP2 NaViT tower + 3D perceiver resampler.

    enc = VisionEncoder.load("mmproj.gguf")             # dtype "auto": measured once per machine
    emb = enc.encode_slices([overview, s1, s2])         # [3, 64, D] float32
    emb = enc.encode_slices(frames, [[0, 5], [10, 15]])  # video: one 64-token group per list

The math is vision_ops.py, the weights vision_weights.py; this module batches slices and holds the
weights. All slices of a call run as one batch: linear layers work on the packed patch rows of every
slice (no compute on padding), attention runs over each slice's own rows. bf16 is chosen ("auto")
only where a measurement on this machine finds it clearly faster (vision_dtype.py). Speeds against
llama.cpp's mtmd: BENCHMARKS.md §2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minicpmv.cpu import default_threads
from minicpmv.schema import R_LN_POST, V_PATCH_EMBD, V_POS_EMBD, V_POST_LN, v_blk

from . import compute_thread
from .mmproj import Mmproj, VisionHParams, load_mmproj
from .vision_dtype import DtypeChoice, choose_vision_dtype
from .vision_ops import attention_for, block_forward, navit_position_ids, patch_rows, resample
from .vision_threads import return_freed_memory, torch_threads
from .vision_weights import (
    Block,
    FileTensors,
    Linear,
    ResamplerWeights,
    fold_resampler,
    pack_linears,
    resampler_weights,
    tower_block,
)

# Tokens per chunk: the tower and the resampler run on whole groups of at most this many patches
# (the reference runs 16 slices per chunk); one image (at most 10 slices of ~1024 patches) is one
# chunk. Streamed weights (resident=False) are read once per chunk.
MAX_BATCH_TOKENS = 16 * 1024
# Inside a chunk each tower layer runs over slices in sub-batches of at most this many patches:
# bounds the activations (about 22 KB per patch per layer in bf16) without splitting a slice. At
# 2048 the largest bf16 activation (fc1's output, 2048 x 4304 x 2 B = 17.6 MB) stays under glibc's
# 32 MB ceiling for serving blocks from the heap: larger ones are fresh mmaps, page-faulted in on
# every layer (BENCHMARKS.md §2 notes the measurement).
SUB_BATCH_TOKENS = 2048


class VisionInputError(ValueError):
    """Bad pixels or temporal ids passed to the encoder (one line naming the argument)."""


class VisionEncoder:
    """Tower + resampler weights in compute dtype; `encode_slices` is the one entry point."""

    def __init__(
        self,
        mm: Mmproj,
        choice: DtypeChoice,
        n_threads: int,
        *,
        resident: bool = True,
        sub_batch_tokens: int = SUB_BATCH_TOKENS,
    ):
        """`choice`: the compute dtype and how it was chosen (vision_dtype.py).
        `resident=True` keeps every weight in memory in the compute dtype (0.9 GB in bf16 for the
        full model). `resident=False` (the low-memory profile) keeps only the small tensors
        (position table, LayerNorms, the folded resampler attention, the patch embedding) and reads
        the tower's and the resampler's output matrices from the mmproj's open file for each chunk (one
        image is one chunk; ~0.7 s per chunk). `sub_batch_tokens`: patches per tower and resampler
        sub-batch (activation memory)."""
        hp = mm.hparams
        self.hparams: VisionHParams = hp
        self.path: Path = mm.path
        self.file = mm.file
        self.legacy_ffn = mm.legacy_ffn
        self.dtype_choice = choice
        self.dtype = dtype = choice.torch_dtype
        self.n_threads = n_threads
        self.embed_dim = hp.embed_dim
        self.query_num = hp.query_num
        self.image_size = hp.image_size
        self.patch_size = hp.patch_size
        self.resident = resident
        self.sub_batch_tokens = max(1, sub_batch_tokens)
        t = mm  # consumed: each tensor is dequantized, converted and dropped in turn (bounds peak memory)
        self.packed = pack = pack_linears(dtype)

        def vec(name: str) -> torch.Tensor:  # LayerNorm parameters and tables stay float32
            return t.take(name).float().contiguous()

        d, p = hp.n_embd, hp.patch_size
        patch_w = t.take(V_PATCH_EMBD + ".weight").reshape(d, 3 * p * p)  # the 14x14 conv as a linear
        self.patch = Linear(patch_w, t.take(V_PATCH_EMBD + ".bias"), dtype, pack=pack)
        self.pos_embd = vec(V_POS_EMBD + ".weight")
        self.norms = [
            (
                vec(v_blk("ln1", i) + ".weight"),
                vec(v_blk("ln1", i) + ".bias"),
                vec(v_blk("ln2", i) + ".weight"),
                vec(v_blk("ln2", i) + ".bias"),
            )
            for i in range(hp.n_layer)
        ]
        self.post_ln_w, self.post_ln_b = vec(V_POST_LN + ".weight"), vec(V_POST_LN + ".bias")
        self.fold = fold_resampler(t.take, hp, dtype, pack)
        self.ln_post = (vec(R_LN_POST + ".weight"), vec(R_LN_POST + ".bias"))
        # the big matrices: converted now (resident) or read again for every chunk
        self.blocks: list[Block] | None = None
        self.resampler: ResamplerWeights | None = None
        if resident:
            self.blocks = [tower_block(i, t.take, hp, self.norms[i], dtype, pack) for i in range(hp.n_layer)]
            self.resampler = resampler_weights(t.take, dtype, pack)
        self._file = FileTensors(mm.file, {n: mm.locate(n) for n in list(mm.tensors)})

    @classmethod
    def load(
        cls,
        mmproj_path: str | os.PathLike,
        *,
        dtype: str = "auto",
        n_threads: int | None = None,
        resident: bool = True,
        sub_batch_tokens: int = SUB_BATCH_TOKENS,
    ) -> "VisionEncoder":
        if n_threads is not None and n_threads < 1:
            raise VisionInputError(f"n_threads: {n_threads} must be >= 1")
        threads = n_threads or default_threads()

        def load() -> "VisionEncoder":  # the dtype probe and the weight conversion are torch work
            try:
                choice = choose_vision_dtype(dtype, threads)
            except ValueError as e:
                raise VisionInputError(str(e)) from None
            return cls(load_mmproj(mmproj_path), choice, threads, resident=resident, sub_batch_tokens=sub_batch_tokens)

        return compute_thread.run(load)

    def close(self) -> None:
        """Close the mmproj file."""
        if getattr(self, "file", None) is not None:
            self.file.close()

    def __del__(self):
        self.close()

    @property
    def weights_nbytes(self) -> int:
        """Resident bytes of the loaded weights: matmul weights (and the resampler's folded
        attention, `ResamplerFold`) in the compute dtype, LayerNorm parameters, the position table
        and the fold's Gram matrix in float32. The matrices read per chunk (resident=False) are not
        counted."""
        linears = [self.patch]
        vectors = [self.pos_embd, self.post_ln_w, self.post_ln_b, *self.ln_post] + [
            v for norms in self.norms for v in norms
        ]
        if self.resident:
            linears += [lin for b in self.blocks for lin in (b.qkv, b.out, b.fc1, b.fc2)]
        big = self.fold.nbytes + (self.resampler.nbytes if self.resampler is not None else 0)
        return sum(x.nbytes for x in linears) + sum(x.numel() * x.element_size() for x in vectors) + big

    # ----------------------------------------------------------------------- public API

    def encode_slices(
        self, pixels: list[np.ndarray], temporal_ids: list[list[int]] | None = None, progress: bool = False
    ) -> np.ndarray:
        """Normalized [3, H, W] float32 slices (H, W multiples of the patch size) -> [G, 64, D]
        float32, one row per group: each slice alone without `temporal_ids`; with them, one group
        per list (consecutive slices, frame-major, id -1 = no temporal term). Runs on the compute
        thread (compute_thread.py)."""
        sizes = self._check_pixels(pixels)
        groups = self._check_groups(temporal_ids, len(pixels))
        return compute_thread.run(self._encode, pixels, sizes, groups, temporal_ids is not None, progress)

    def _encode(self, pixels, sizes, groups, temporal: bool, progress: bool) -> np.ndarray:
        out = []
        bar = tqdm(
            total=len(groups), unit="group" if temporal else "slice", desc="vision", disable=not progress, leave=False
        )
        with bar, torch_threads(self.n_threads), torch.inference_mode():
            for chunk in _chunk_groups(groups, sizes, MAX_BATCH_TOKENS):
                first = chunk[0][0]
                last = chunk[-1][0] + len(chunk[-1][1])
                feats = self._tower(pixels[first:last], sizes[first:last])
                rel = [(s - first, ids) for s, ids in chunk]
                out.append(self._resample(feats, sizes[first:last], rel, temporal))
                bar.update(len(chunk))
        result = torch.cat(out).float().numpy()
        del out, feats
        return_freed_memory()
        return result

    def vision(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Tower output (after post-LN) per slice: [h*w, n_embd] float32 (for tests / debugging)."""
        sizes = self._check_pixels(pixels)

        def tower() -> list[np.ndarray]:
            with torch_threads(self.n_threads), torch.inference_mode():
                feats = self._tower(pixels, sizes)
                return [x.float().numpy() for x in torch.split(feats, [h * w for h, w in sizes])]

        return compute_thread.run(tower)

    # ----------------------------------------------------------------------- checks

    def _check_pixels(self, pixels: list[np.ndarray]) -> list[tuple[int, int]]:
        if not pixels:
            raise VisionInputError("pixels: no slices given")
        p = self.patch_size
        sizes = []
        for i, a in enumerate(pixels):
            shape = getattr(a, "shape", None)
            if shape is None or len(shape) != 3 or shape[0] != 3:
                raise VisionInputError(f"pixels[{i}]: expected a [3, H, W] array, got shape {shape}")
            if shape[1] < p or shape[2] < p or shape[1] % p or shape[2] % p:
                raise VisionInputError(
                    f"pixels[{i}]: size {shape[1]}x{shape[2]} is not a positive multiple of the {p}-pixel patch"
                )
            sizes.append((shape[1] // p, shape[2] // p))
        return sizes

    @staticmethod
    def _check_groups(temporal_ids, n: int) -> list[tuple[int, list[int]]]:
        """[(first slice index, ids)] per group."""
        if temporal_ids is None:
            return [(i, [-1]) for i in range(n)]
        groups, start = [], 0
        for g in temporal_ids:
            try:
                ids = [int(t) for t in g]
            except (TypeError, ValueError):
                raise VisionInputError(f"temporal_ids: group {g!r} is not a list of integer ids") from None
            if not ids or any(t < -1 for t in ids):
                raise VisionInputError(f"temporal_ids: group {g!r} must be a non-empty list of ids >= -1")
            groups.append((start, ids))
            start += len(ids)
        if start != n:
            raise VisionInputError(f"temporal_ids: groups cover {start} slices but {n} were given")
        return groups

    # ----------------------------------------------------------------------- tower and resampler

    def _tower_blocks(self) -> Iterator[Block]:
        """The tower's blocks in order: resident, or read from the file one at a time."""
        if self.blocks is not None:
            yield from self.blocks
            return
        hp, f = self.hparams, self._file
        for i in range(hp.n_layer):
            yield tower_block(i, f.take, hp, self.norms[i], self.dtype, self.packed)

    def _tower(self, pixels: list[np.ndarray], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """Packed [sum h*w, n_embd] float32 tower output."""
        hp, dt = self.hparams, self.dtype
        p, d = hp.patch_size, hp.n_embd
        lens = [h * w for h, w in sizes]
        patches = torch.cat([patch_rows(a, p) for a in pixels])
        ids = torch.cat([navit_position_ids(h, w, hp.pos_buckets) for h, w in sizes])
        x = self.patch(patches.to(dt)).float()
        del patches
        x += self.pos_embd[ids]

        attend = attention_for(dt, hp.n_head)
        subs = _sub_batches(lens, self.sub_batch_tokens)
        for blk in self._tower_blocks():
            for lo, hi, sl in subs:  # whole slices: attention never crosses a sub-batch
                block_forward(x[lo:hi], blk, lens[sl], hp.eps, dt, attend)
            del blk  # a streamed block is freed before the next one is read
        return F.layer_norm(x, (d,), self.post_ln_w, self.post_ln_b, hp.eps)

    def _resample(
        self, feats: torch.Tensor, sizes: list[tuple[int, int]], groups: list[tuple[int, list[int]]], temporal: bool
    ) -> torch.Tensor:
        """Packed tower output of the slices in `groups` -> [G, query_num, D], groups in runs of
        at most sub_batch_tokens patches (each patch has heads x queries = 2,048 float32 scores: for
        a whole image at once they would take about 80 MB)."""
        hp = self.hparams
        r = self.resampler or resampler_weights(self._file.take, self.dtype, self.packed)
        offs = np.cumsum([0] + [h * w for h, w in sizes])
        outs = []
        for run in _chunk_groups(groups, sizes, self.sub_batch_tokens):
            s0, s1 = run[0][0], run[-1][0] + len(run[-1][1])
            outs.append(
                resample(
                    self.fold,
                    r,
                    self.ln_post,
                    hp,
                    self.dtype,
                    feats[int(offs[s0]) : int(offs[s1])],
                    sizes[s0:s1],
                    [(s - s0, g) for s, g in run],
                    temporal,
                )
            )
        return torch.cat(outs)


def _sub_batches(lens: list[int], budget: int) -> list[tuple[int, int, slice]]:
    """Consecutive runs of whole slices of at most `budget` patches (>= 1 slice):
    (first row, end row, slice range)."""
    out, start, row, n = [], 0, 0, 0
    for i, L in enumerate(lens):
        if i > start and n + L > budget:
            out.append((row, row + n, slice(start, i)))
            start, row, n = i, row + n, 0
        n += L
    out.append((row, row + n, slice(start, len(lens))))
    return out


def _chunk_groups(groups, sizes, budget: int):
    """Consecutive runs of whole groups whose patch count stays within `budget` (>= 1 group)."""
    chunk, tokens = [], 0
    for s, ids in groups:
        n = sum(h * w for h, w in sizes[s : s + len(ids)])
        if chunk and tokens + n > budget:
            yield chunk
            chunk, tokens = [], 0
        chunk.append((s, ids))
        tokens += n
    if chunk:
        yield chunk
