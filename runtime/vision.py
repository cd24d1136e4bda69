"""MiniCPM-V 4.5 vision path on the CPU in torch: SigLIP2 NaViT tower + 3D perceiver resampler.

    enc = VisionEncoder.load("mmproj.gguf")             # dtype "auto": bf16 if the CPU has it
    emb = enc.encode_slices([overview, s1, s2])         # [3, 64, D] float32
    emb = enc.encode_slices(frames, [[0, 5], [10, 15]])  # video: one 64-token group per list

Math follows the reference model (docs/reference-model.md §2-§3):
- tower: 14x14 patch embedding, NaViT position ids (float32 `arange` + `bucketize` exactly as the
  reference, which differs from floor(70*i/n) for some sides), pre-LN blocks with bidirectional
  attention, tanh GELU, post-LN;
- resampler: kv projection, ln_kv, keys = x + 2-D sin-cos (+ temporal sin-cos), values = x,
  ln_q(query) as queries, 128-wide heads, ln_post, proj. The queries are constant, so the key and
  value projections are folded into them (see VisionEncoder.__init__): half the FLOPs, same math.

All slices of a call run as one batch: linear layers work on the packed patch rows of every slice
(no compute on padding). float32 mode: attention runs on a right-padded [B, heads, Lmax, head_dim]
view with a key padding mask (torch's fused attention). bf16 mode: matmuls take bf16 inputs and
accumulate in float32 (oneDNN), attention runs per (slice, head) on the slice's own rows with the
softmax computed in float32; the residual stream and LayerNorms stay in float32 in both modes.

bf16 is the default ("auto") only where the CPU has bf16 dot products (AVX512-BF16/AMX, Apple
silicon): there its matmuls run near the CPU's peak, well ahead of float32. Measured speeds against
llama.cpp's mtmd are in BENCHMARKS.md §2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm
import torch
import torch.nn.functional as F

from minicpmv.cpu import default_threads
from minicpmv.schema import (
    R_ATTN_K, R_ATTN_OUT, R_ATTN_Q, R_ATTN_V, R_KV, R_LN_KV, R_LN_POST, R_LN_Q, R_PROJ, R_QUERY,
    V_PATCH_EMBD, V_POS_EMBD, V_POST_LN, v_blk,
)
from minicpmv.sincos import sincos, sincos_2d

from .mmproj import Mmproj, TensorLocation, VisionHParams, load_mmproj, read_tensor
from .vision_dtype import DtypeChoice, choose_vision_dtype

# Tokens per chunk: the tower and the resampler run on whole groups of at most this many patches
# (the reference runs 16 slices per chunk); one image (at most 10 slices of ~1024 patches) is one
# chunk. Streamed weights (resident=False) are read once per chunk.
MAX_BATCH_TOKENS = 16 * 1024
# Inside a chunk each tower layer runs over slices in sub-batches of at most this many patches:
# bounds the activations (about 22 KB per patch per layer in bf16) without splitting a slice. At
# 2048 the largest bf16 activation (fc1's output, 2048 x 4304 x 2 B = 17.6 MB) stays under glibc's
# 32 MB ceiling for serving blocks from the heap: larger ones are fresh mmaps, page-faulted in on
# every layer (10 slices, paired runs on a Zen 4: 0.8-2.4 M minor faults and 33.7 s at 4096,
# 0.32 M and 30.6 s at 2048).
SUB_BATCH_TOKENS = 2048


class VisionInputError(ValueError):
    """Bad pixels or temporal ids passed to the encoder (one line naming the argument)."""


def patch_rows(pixels: np.ndarray, p: int) -> torch.Tensor:
    """[3, H, W] pixels -> [(H/p)*(W/p), 3*p*p] float32: patches in raster order, each flattened
    (channel, row, col), the layout of the reference's unfold, so the p x p patch convolution is one
    matmul with its weight reshaped to [width, 3*p*p]."""
    _, H, W = pixels.shape
    h, w = H // p, W // p
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return x.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)


# --------------------------------------------------------------------------- position tables

@functools.lru_cache(maxsize=256)
def navit_position_ids(h: int, w: int, buckets: int) -> torch.Tensor:
    """Row-major position ids of an h x w patch grid, computed with the reference's torch ops:
    float32 fractional coordinates (the step is 1 / an int32 tensor) bucketized against
    arange(1/buckets, 1, 1/buckets). This is NOT always floor(buckets*i/h) (e.g. h = 25, i = 5)."""
    boundaries = torch.arange(1 / buckets, 1.0, 1 / buckets)
    frac_h = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(h, dtype=torch.int32))
    frac_w = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(w, dtype=torch.int32))
    bh = torch.bucketize(frac_h, boundaries, right=True)
    bw = torch.bucketize(frac_w, boundaries, right=True)
    return (bh[:, None] * buckets + bw).flatten()


def pos_embed_2d(h: int, w: int, embed_dim: int) -> torch.Tensor:
    """[h*w, D] float32 = reference pos_embed[:h, :w] flattened: column channels first, then row.
    Computed for any size (the reference grows its table for sides > 70)."""
    return torch.from_numpy(sincos_2d(embed_dim, h, w).reshape(h * w, embed_dim))


def temporal_embed(ids: list[int], embed_dim: int) -> torch.Tensor:
    """[len(ids), D] float32 rows of the reference temporal table (id in 0.1 s units)."""
    return torch.from_numpy(sincos(np.asarray(ids, dtype=np.float32), embed_dim))


# --------------------------------------------------------------------------- weights

# Pre-pack matmul weights into oneDNN's blocked layout (what torch's inductor does when freezing):
# measurably faster than F.linear in bf16 and f32 on AVX-512, and fc1 gets GELU fused. Falls back
# to F.linear when this torch build lacks the ops.
USE_ONEDNN_PACKING = True


@functools.lru_cache(maxsize=4)
def _onednn_available(dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears work here for `dtype` (tried once on a tiny layer)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.ones(8, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None),
                                               None, "gelu", [], "tanh")
        return tuple(y.shape) == (2, 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Linear:
    """y = x @ w.T + b (optionally tanh-GELU) on 2-D inputs in the compute dtype."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype,
                 gelu: bool = False, pack: bool = False):
        self.nbytes = w.numel() * dtype.itemsize + (b.numel() * dtype.itemsize if b is not None else 0)
        self.gelu = gelu
        w = w.to(dtype).contiguous()
        self.b = b.to(dtype).contiguous() if b is not None else None
        self.packed = pack
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, None) if pack else w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            if self.gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, self.w, self.b, "none", [], "")
        y = F.linear(x, self.w, self.b)
        return F.gelu(y, approximate="tanh") if self.gelu else y


@dataclass
class Block:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: Linear          # q|k|v fused: [3d, d]
    out: Linear
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1: Linear          # with tanh GELU
    fc2: Linear


@dataclass
class ResamplerWeights:
    """The resampler's big matrices (the folded score matrix is always resident: it is derived)."""
    kv: Linear           # tower width -> D, no bias
    wv_t: torch.Tensor   # [H, D, hd] value projection, transposed per head
    bv: torch.Tensor     # [H, 1, hd]
    o: Linear
    proj: Linear         # [out, in]: x @ proj_hf == F.linear(x, proj.weight)


class _FileTensors:
    """`take(name)` for weights read from the mmproj on demand (resident=False): positioned reads
    through the page cache, so between passes nothing of them stays in the process; f16 matrices
    are converted straight to the compute dtype (no float32 copy)."""

    def __init__(self, path: Path, locs: dict[str, TensorLocation]):
        self.path, self.locs = path, locs

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def take(self, name: str) -> torch.Tensor:
        return read_tensor(self.fd, self.locs[name])


class VisionEncoder:
    """Tower + resampler weights in compute dtype; `encode_slices` is the one entry point."""

    def __init__(self, mm: Mmproj, dtype: torch.dtype, n_threads: int, *, resident: bool = True,
                 sub_batch_tokens: int = SUB_BATCH_TOKENS):
        """The resampler's big matrices (kv, v, out, proj: 0.1 GB in bf16 for the full model) are
        always read from the mmproj for each chunk (one image is one chunk): they are used once
        per chunk, and reading and converting them costs about 0.1 s. `resident=False` does the
        same for the tower's matrices (0.8 GB in bf16, ~0.6 s per chunk): only the small tensors
        stay (position table, LayerNorms, the folded resampler scores, the patch embedding).
        `sub_batch_tokens`: patches per tower and resampler sub-batch (activation memory)."""
        hp = mm.hparams
        self.hparams: VisionHParams = hp
        self.path: Path = mm.path
        self.legacy_ffn = mm.legacy_ffn
        self.dtype = dtype
        # how the dtype was chosen (VisionEncoder.load sets it; a direct construction forces it)
        self.dtype_choice = DtypeChoice("bf16" if dtype == torch.bfloat16 else "f32", "forced")
        self.n_threads = n_threads
        self.embed_dim = hp.embed_dim
        self.query_num = hp.query_num
        self.image_size = hp.image_size
        self.patch_size = hp.patch_size
        self._workers: ThreadPoolExecutor | None = None
        self.resident = resident
        self.sub_batch_tokens = max(1, sub_batch_tokens)
        t = mm  # consumed: each tensor is dequantized, converted and dropped in turn (bounds peak memory)
        pack = USE_ONEDNN_PACKING and _onednn_available(dtype)
        self.packed = pack

        def vec(name: str) -> torch.Tensor:   # LayerNorm parameters and tables stay float32
            return t.take(name).float().contiguous()

        d, p = hp.n_embd, hp.patch_size
        patch_w = t.take(V_PATCH_EMBD + ".weight").reshape(d, 3 * p * p)  # the 14x14 conv as a linear
        self.patch = Linear(patch_w, t.take(V_PATCH_EMBD + ".bias"), dtype, pack=pack)
        self.pos_embd = vec(V_POS_EMBD + ".weight")
        self.norms = [(vec(v_blk("ln1", i) + ".weight"), vec(v_blk("ln1", i) + ".bias"),
                       vec(v_blk("ln2", i) + ".weight"), vec(v_blk("ln2", i) + ".bias")) for i in range(hp.n_layer)]
        self.post_ln_w, self.post_ln_b = vec(V_POST_LN + ".weight"), vec(V_POST_LN + ".bias")

        # The resampler's queries do not depend on the input, so its attention folds into two
        # matmuls on the keys' and values' inputs (x = ln_kv output, keys = x + positions):
        #   scores_h = q_h . (Wk_h key + bk_h) / sqrt(hd) = key . (Wk_h^T q_h / sqrt(hd)) + const,
        #     and a per-query constant cancels in the softmax, so bk drops out;
        #   out_h = P_h (x Wv_h^T + bv_h) = (P_h x) Wv_h^T + bv_h, as each row of P_h sums to 1.
        # Half the FLOPs of projecting every key and value to D channels, same result.
        Q, H, D = hp.query_num, hp.n_head_resampler, hp.embed_dim
        hd = D // H
        with torch.inference_mode():
            q = F.layer_norm(t.take(R_QUERY), (D,), t.take(R_LN_Q + ".weight"), t.take(R_LN_Q + ".bias"), hp.eps)
            q = F.linear(q, t.take(R_ATTN_Q + ".weight"), t.take(R_ATTN_Q + ".bias"))   # [Q, D]
            wk = t.take(R_ATTN_K + ".weight").view(H, hd, D)
            t.take(R_ATTN_K + ".bias")
            qk = torch.bmm(q.view(Q, H, hd).transpose(0, 1), wk) * hd ** -0.5            # [H, Q, D]
        self.scores = Linear(qk.reshape(H * Q, D), None, dtype, pack=pack)   # keys -> [N, H*Q]
        self.ln_kv_w, self.ln_kv_b = vec(R_LN_KV + ".weight"), vec(R_LN_KV + ".bias")
        self.ln_post_w, self.ln_post_b = vec(R_LN_POST + ".weight"), vec(R_LN_POST + ".bias")

        # the big matrices: the tower's converted now (resident) or, like the resampler's, read
        # again for every chunk
        self.blocks = [self._block(i, t.take) for i in range(hp.n_layer)] if resident else None
        self._file = _FileTensors(mm.path, {n: mm.locate(n) for n in list(mm.tensors)})

    # ----------------------------------------------------------------------- weights

    def _linear(self, take, base: str, bias: bool = True, gelu: bool = False) -> Linear:
        return Linear(take(base + ".weight"), take(base + ".bias") if bias else None, self.dtype, gelu,
                      self.packed)

    def _block(self, i: int, take) -> Block:
        """Tower block i from `take(name) -> float32 tensor`; q|k|v fused, with the attention scale
        1/sqrt(head_dim) folded into the q rows."""
        hp = self.hparams
        bases = [v_blk(k, i) for k in ("attn_q", "attn_k", "attn_v")]
        w = torch.cat([take(b + ".weight") for b in bases]).float()   # the scale is folded in float32
        b = torch.cat([take(b + ".bias") for b in bases]).float()
        scale = (hp.n_embd // hp.n_head) ** -0.5
        w[:hp.n_embd] *= scale
        b[:hp.n_embd] *= scale
        ln1_w, ln1_b, ln2_w, ln2_b = self.norms[i]
        return Block(ln1_w=ln1_w, ln1_b=ln1_b, qkv=Linear(w, b, self.dtype, pack=self.packed),
                     out=self._linear(take, v_blk("attn_out", i)), ln2_w=ln2_w, ln2_b=ln2_b,
                     fc1=self._linear(take, v_blk("ffn_up", i), gelu=True),
                     fc2=self._linear(take, v_blk("ffn_down", i)))

    def _resampler(self, take) -> ResamplerWeights:
        hp = self.hparams
        H, D = hp.n_head_resampler, hp.embed_dim
        hd = D // H
        return ResamplerWeights(
            kv=self._linear(take, R_KV, bias=False),
            wv_t=take(R_ATTN_V + ".weight").view(H, hd, D).transpose(1, 2).to(self.dtype).contiguous(),
            bv=take(R_ATTN_V + ".bias").view(H, 1, hd).to(self.dtype),
            o=self._linear(take, R_ATTN_OUT), proj=self._linear(take, R_PROJ, bias=False))

    def _tower_blocks(self) -> Iterator[Block]:
        """The tower's blocks in order: resident, or read from the file one at a time."""
        if self.resident:
            yield from self.blocks
            return
        with self._file as f:
            for i in range(self.hparams.n_layer):
                yield self._block(i, f.take)

    def _resampler_weights(self) -> ResamplerWeights:
        with self._file as f:
            return self._resampler(f.take)

    # ----------------------------------------------------------------------- construction

    @classmethod
    def load(cls, mmproj_path: str | os.PathLike, *, dtype: str = "auto", n_threads: int | None = None,
             resident: bool = True, sub_batch_tokens: int = SUB_BATCH_TOKENS) -> "VisionEncoder":
        if n_threads is not None and n_threads < 1:
            raise VisionInputError(f"n_threads: {n_threads} must be >= 1")
        threads = n_threads or default_threads()
        try:
            choice = choose_vision_dtype(dtype, threads)
        except ValueError as e:
            raise VisionInputError(str(e)) from None
        mm = load_mmproj(mmproj_path)
        enc = cls(mm, choice.torch_dtype, threads, resident=resident, sub_batch_tokens=sub_batch_tokens)
        enc.dtype_choice = choice
        return enc

    def close(self) -> None:
        """Stop the attention worker threads (they are started on first use in bf16 mode)."""
        workers = getattr(self, "_workers", None)
        if workers is not None:
            workers.shutdown(wait=False)
            self._workers = None

    def __del__(self):
        self.close()

    @property
    def weights_nbytes(self) -> int:
        """Resident bytes of the loaded weights: matmul weights (and the resampler's folded query
        matrix) in the compute dtype, LayerNorm parameters and the position table in float32. The
        matrices read per chunk (the resampler's; with resident=False the tower's) are not counted."""
        linears = [self.patch, self.scores]
        vectors = [self.pos_embd, self.post_ln_w, self.post_ln_b, self.ln_kv_w, self.ln_kv_b,
                   self.ln_post_w, self.ln_post_b] + [v for norms in self.norms for v in norms]
        if self.resident:
            linears += [lin for b in self.blocks for lin in (b.qkv, b.out, b.fc1, b.fc2)]
        return sum(x.nbytes for x in linears) + sum(x.numel() * x.element_size() for x in vectors)

    # ----------------------------------------------------------------------- public API

    def encode_slices(self, pixels: list[np.ndarray], temporal_ids: list[list[int]] | None = None,
                      progress: bool = False) -> np.ndarray:
        """Normalized [3, H, W] float32 slices (H, W multiples of the patch size) -> [G, 64, D]
        float32, one row per group: each slice alone without `temporal_ids`; with them, one group
        per list (consecutive slices, frame-major, id -1 = no temporal term)."""
        sizes = self._check_pixels(pixels)
        groups = self._check_groups(temporal_ids, len(pixels))
        out = []
        bar = tqdm(total=len(groups), unit="group" if temporal_ids else "slice", desc="vision",
                   disable=not progress, leave=False)
        with bar, _threads(self.n_threads), torch.inference_mode():
            for chunk in _chunk_groups(groups, sizes, MAX_BATCH_TOKENS):
                first = chunk[0][0]
                last = chunk[-1][0] + len(chunk[-1][1])
                feats = self._tower(pixels[first:last], sizes[first:last])
                rel = [(s - first, ids) for s, ids in chunk]
                out.append(self._resample(feats, sizes[first:last], rel, temporal_ids is not None))
                bar.update(len(chunk))
        result = torch.cat(out).float().numpy()
        del out, feats
        _return_freed_memory()
        return result

    def vision(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Tower output (after post-LN) per slice: [h*w, n_embd] float32 (for tests / debugging)."""
        sizes = self._check_pixels(pixels)
        with _threads(self.n_threads), torch.inference_mode():
            feats = self._tower(pixels, sizes)
        lens = [h * w for h, w in sizes]
        return [x.float().numpy() for x in torch.split(feats, lens)]

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
                raise VisionInputError(f"pixels[{i}]: size {shape[1]}x{shape[2]} is not a positive "
                                       f"multiple of the {p}-pixel patch")
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

    # ----------------------------------------------------------------------- tower

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

        attend = attention_for(dt, hp.n_head, self._pool() if dt == torch.bfloat16 else None, self.n_threads)
        subs = _sub_batches(lens, self.sub_batch_tokens)
        for blk in self._tower_blocks():
            for lo, hi, sl in subs:   # whole slices: attention never crosses a sub-batch
                x[lo:hi] = block_forward(x[lo:hi], blk, lens[sl], hp.eps, dt, attend)
            del blk   # a streamed block is freed before the next one is read
        return F.layer_norm(x, (d,), self.post_ln_w, self.post_ln_b, hp.eps)

    def _pool(self) -> ThreadPoolExecutor | None:
        """n_threads single-threaded torch workers for bf16 attention (None when n_threads is 1)."""
        if self._workers is None and self.n_threads > 1:
            self._workers = worker_pool(self.n_threads)
        return self._workers

    # ----------------------------------------------------------------------- resampler

    def _resample(self, feats: torch.Tensor, sizes: list[tuple[int, int]],
                  groups: list[tuple[int, list[int]]], temporal: bool) -> torch.Tensor:
        """Packed tower output of the slices in `groups` -> [G, query_num, D], groups in runs of
        at most sub_batch_tokens patches (its keys and values are D = 4096 wide: for a whole image
        at once they would take about 0.6 GB)."""
        r = self._resampler_weights()
        offs = np.cumsum([0] + [h * w for h, w in sizes])
        outs = []
        for run in _chunk_groups(groups, sizes, self.sub_batch_tokens):
            s0, s1 = run[0][0], run[-1][0] + len(run[-1][1])
            outs.append(self._resample_run(r, feats[int(offs[s0]):int(offs[s1])], sizes[s0:s1],
                                           [(s - s0, g) for s, g in run], temporal))
        return torch.cat(outs)

    def _resample_run(self, r: ResamplerWeights, feats: torch.Tensor, sizes: list[tuple[int, int]],
                      groups: list[tuple[int, list[int]]], temporal: bool) -> torch.Tensor:
        hp, dt = self.hparams, self.dtype
        D, H, Q = hp.embed_dim, hp.n_head_resampler, hp.query_num
        lens = [h * w for h, w in sizes]
        x = F.layer_norm(r.kv(feats.to(dt)).float(), (D,), self.ln_kv_w, self.ln_kv_b, hp.eps)
        keys = x + torch.cat([pos_embed_2d(h, w, D) for h, w in sizes])
        if temporal:
            ids = [t for _, g in groups for t in g]
            if any(t >= 0 for t in ids):
                rows = temporal_embed([max(t, 0) for t in ids], D)
                rows[torch.tensor([t < 0 for t in ids])] = 0.0
                keys = keys + torch.repeat_interleave(rows, torch.tensor(lens), dim=0)
        scores = self.scores(keys.to(dt))                             # [N, H*Q]
        xv = x.to(dt)
        # Each group's keys are one contiguous run of packed rows (its frames, frame-major): one
        # attention over exactly those rows, so no padding or mask is needed.
        offs = np.cumsum([0] + lens)
        outs = []
        for s, g in groups:
            lo, hi = int(offs[s]), int(offs[s + len(g)])
            p = torch.softmax(scores[lo:hi].t().float(), dim=-1).to(dt)  # [H*Q, n], float32 softmax
            px = torch.mm(p, xv[lo:hi]).view(H, Q, D)                    # P_h x
            o = torch.baddbmm(r.bv, px, r.wv_t)                          # [H, Q, hd]
            outs.append(o.transpose(0, 1).reshape(Q, D))
        G = len(groups)
        out = r.o(torch.cat(outs)).float()                                # [G*Q, D]
        out = F.layer_norm(out, (D,), self.ln_post_w, self.ln_post_b, hp.eps)
        return r.proj(out.to(dt)).float().view(G, Q, D)


# --------------------------------------------------------------------------- one tower block
# Module-level so that the dtype probe (vision_dtype.py) times exactly the code the encoder runs.

def block_forward(x: torch.Tensor, blk: Block, lens: list[int], eps: float, dt: torch.dtype,
                  attend) -> torch.Tensor:
    """One pre-LN encoder block on packed float32 rows [N, d]; matmuls in `dt`."""
    x = attention_block(x, blk.ln1_w, blk.ln1_b, blk.qkv, blk.out, lens, eps, dt, attend)
    y = F.layer_norm(x, (x.shape[1],), blk.ln2_w, blk.ln2_b, eps).to(dt)
    return x + blk.fc2(blk.fc1(y))


def attention_block(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, qkv: Linear, out: Linear,
                    lens: list[int], eps: float, dt: torch.dtype, attend) -> torch.Tensor:
    """The attention half of a block: x + out(attention(qkv(LN1(x))))."""
    y = F.layer_norm(x, (x.shape[1],), ln_w, ln_b, eps).to(dt)
    return x + out(attend(qkv(y), lens))


def attention_for(dt: torch.dtype, n_head: int, pool: ThreadPoolExecutor | None, n_workers: int):
    """The self-attention the tower runs in `dt`: (packed qkv rows, slice lengths) -> [N, d]."""
    if dt == torch.bfloat16:
        return functools.partial(attention_per_head, n_head=n_head, pool=pool, n_workers=n_workers)
    return functools.partial(attention_padded, n_head=n_head)


def attention_padded(qkv: torch.Tensor, lens: list[int], n_head: int) -> torch.Tensor:
    """Self-attention of packed [N, 3d] rows (q pre-scaled): the slices right-padded to one
    [B, heads, Lmax, hd] batch, padded keys masked, torch's fused (flash) attention."""
    d, nh = qkv.shape[1] // 3, n_head
    B, Lmax = len(lens), max(lens)
    uniform = all(n == Lmax for n in lens)
    if not uniform:  # packed row l of slice b -> padded row b*Lmax + l
        pad_idx = torch.cat([torch.arange(n) + b * Lmax for b, n in enumerate(lens)])
        padded = qkv.new_zeros(B * Lmax, 3 * d)
        padded[pad_idx] = qkv
        qkv = padded
        mask = torch.arange(Lmax)[None, :] < torch.tensor(lens)[:, None]
        mask = mask[:, None, None, :]                                # [B, 1, 1, Lmax], True = key
    q, k, v = qkv.view(B, Lmax, 3, nh, d // nh).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if uniform else mask, scale=1.0)
    a = a.transpose(1, 2).reshape(B * Lmax, d)
    return a if uniform else a[pad_idx]


def attention_per_head(qkv: torch.Tensor, lens: list[int], n_head: int,
                       pool: ThreadPoolExecutor | None, n_workers: int) -> torch.Tensor:
    """bf16 self-attention, one (slice, head) at a time on its own rows (no padding, no mask):
    QK^T and PV are bf16 matmuls with float32 accumulation, the softmax is computed in float32
    and rounded to bf16 (as the reference model run in bf16). At head_dim 72 this beats torch's
    fused attention, which does not use the CPU's bf16 dot products.
    The (slice, head) tasks are spread over the n_workers single-threaded workers of `pool`: hundreds of small
    multi-threaded ops would each end in a barrier, which stalls whenever the machine is busy."""
    nh = n_head
    N, d = qkv.shape[0], qkv.shape[1] // 3
    hd = d // nh
    qkv = qkv.view(N, 3, nh, hd)
    q, k = qkv[:, :2].permute(1, 2, 0, 3).contiguous()         # [nh, N, hd] each
    vt = qkv[:, 2].permute(1, 2, 0).contiguous()                # [nh, hd, N]
    out_t = torch.empty(nh, hd, N, dtype=qkv.dtype)              # (P V)^T per head
    offs = np.cumsum([0] + lens)
    tasks = [(slice(int(offs[i]), int(offs[i + 1])), h) for i in range(len(lens)) for h in range(nh)]

    def run(part: list[tuple[slice, int]]) -> None:
        with torch.inference_mode():
            for rows, h in part:
                p = torch.softmax(F.linear(q[h, rows], k[h, rows]), dim=-1)   # [n, n]
                out_t[h, :, rows] = F.linear(vt[h, :, rows], p)            # V^T P^T

    if pool is None:
        run(tasks)
    else:
        n = n_workers
        for f in [pool.submit(run, tasks[i::n]) for i in range(n)]:
            f.result()
    return out_t.permute(2, 0, 1).reshape(N, d)


def worker_pool(n_threads: int) -> ThreadPoolExecutor:
    """n_threads single-threaded torch workers, all started now (a barrier keeps each one busy until
    all exist). Their set_num_threads(1) also records a process-wide default for threads created
    later, which is put back here (the workers keep their own setting of 1)."""
    pool = ThreadPoolExecutor(n_threads, thread_name_prefix="vision-attn",
                              initializer=torch.set_num_threads, initargs=(1,))
    barrier = threading.Barrier(n_threads)
    for f in [pool.submit(barrier.wait) for _ in range(n_threads)]:
        f.result()
    torch.set_num_threads(n_threads)
    return pool


# --------------------------------------------------------------------------- helpers


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
        n = sum(h * w for h, w in sizes[s:s + len(ids)])
        if chunk and tokens + n > budget:
            yield chunk
            chunk, tokens = [], 0
        chunk.append((s, ids))
        tokens += n
    if chunk:
        yield chunk


def _return_freed_memory() -> None:
    """Hand the activations' freed heap back to the OS (glibc keeps freed blocks in per-thread
    arenas, which the vision workers fill); a no-op where malloc_trim does not exist."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, musl)
        return None


_malloc_trim = _find_malloc_trim()


class _threads:
    """Run with torch's intra-op thread count set to n, restoring it afterwards."""

    def __init__(self, n: int):
        self.n, self.old = n, None

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.old != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old != self.n:
            torch.set_num_threads(self.old)
