"""MiniCPM-V 4.5 vision path on the CPU in torch: SigLIP2 NaViT tower + 3D perceiver resampler.

    enc = VisionEncoder.load("mmproj.gguf")             # dtype "auto": bf16 if the CPU has it
    emb = enc.encode_slices([overview, s1, s2])         # [3, 64, D] float32
    emb = enc.encode_slices(frames, [[0, 5], [10, 15]])  # video: one 64-token group per list

Math follows the reference model (hf-reference.md §2-§3):
- tower: 14x14 patch embedding, NaViT position ids (float32 `arange` + `bucketize` exactly as the
  reference, which differs from floor(70*i/n) for some sides), pre-LN blocks with bidirectional
  attention, tanh GELU, post-LN;
- resampler: kv projection, ln_kv, keys = x + 2-D sin-cos (+ temporal sin-cos), values = x,
  ln_q(query) as queries, 128-wide heads, ln_post, proj.

All slices of a call run as one batch: linear layers work on the packed patch rows of every slice
(no compute on padding); attention runs on a right-padded [B, heads, Lmax, head_dim] view with a
key padding mask. In bf16 mode the linear layers take bf16 inputs and weights (oneDNN, float32
accumulation); the residual stream, LayerNorms and attention (scores, softmax, weighted sum) stay
in float32.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minicpmv.convert.names import (
    R_ATTN_K, R_ATTN_OUT, R_ATTN_Q, R_ATTN_V, R_KV, R_LN_KV, R_LN_POST, R_LN_Q, R_PROJ, R_QUERY,
    V_PATCH_EMBD, V_POS_EMBD, V_POST_LN, v_blk,
)

from .mmproj import Mmproj, VisionHParams, load_mmproj

# Tokens per tower batch: bounds activation memory for long videos (the reference runs 16 slices
# per chunk); one image (at most 10 slices of ~1024 patches) always fits in a single batch.
MAX_BATCH_TOKENS = 16 * 1024


class VisionInputError(ValueError):
    """Bad pixels or temporal ids passed to the encoder (one line naming the argument)."""


# --------------------------------------------------------------------------- CPU facts

def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 / AMX-BF16 on x86 Linux, or Apple silicon."""
    if platform.system() == "Darwin":
        return platform.machine() == "arm64"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; os.cpu_count() elsewhere."""
    n = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return n
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            cores.add((phys, val.strip()))
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = n
    return max(1, min(len(cores) or n, allowed))


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


def _omega(dim: int) -> np.ndarray:
    """Reference sin-cos frequencies for `dim` output channels (numpy float32 throughout)."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    return 1.0 / 10000 ** omega


@functools.lru_cache(maxsize=8)
def _sincos_1d(n: int, dim: int) -> torch.Tensor:
    """[n, dim] float32: row p = [sin(p*w), cos(p*w)], the reference's per-axis encoding of the
    2-D table (same numpy float32 ops, so values are bit-identical to its [70, 70, D] table)."""
    grid = np.arange(n, dtype=np.float32)[None, :]
    out = np.einsum("hw,d->hwd", grid, _omega(dim))
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=-1)[0])


def pos_embed_2d(h: int, w: int, embed_dim: int) -> torch.Tensor:
    """[h*w, D] float32 = reference pos_embed[:h, :w] flattened: column channels first, then row.
    Computed for any size (the reference grows its table for sides > 70)."""
    half = embed_dim // 2
    enc = _sincos_1d(max(h, w, 70), half)
    col = enc[:w][None, :, :].expand(h, w, half)
    row = enc[:h][:, None, :].expand(h, w, half)
    return torch.cat([col, row], dim=-1).reshape(h * w, embed_dim)


def temporal_embed(ids: list[int], embed_dim: int) -> torch.Tensor:
    """[len(ids), D] float32 rows of the reference temporal table (id in 0.1 s units)."""
    pos = np.asarray(ids, dtype=np.float32)
    out = np.einsum("m,d->md", pos, _omega(embed_dim))
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1))


# --------------------------------------------------------------------------- weights

@dataclass
class Block:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor   # q|k|v fused: [3d, d]
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


def _resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype in ("f32", "float32"):
        return torch.float32
    raise VisionInputError(f"dtype: {dtype!r} is not one of auto, bf16, f32")


class VisionEncoder:
    """Tower + resampler weights in compute dtype; `encode_slices` is the one entry point."""

    def __init__(self, mm: Mmproj, dtype: torch.dtype, n_threads: int):
        hp = mm.hparams
        self.hparams: VisionHParams = hp
        self.path: Path = mm.path
        self.legacy_ffn = mm.legacy_ffn
        self.dtype = dtype
        self.n_threads = n_threads
        self.embed_dim = hp.embed_dim
        self.query_num = hp.query_num
        self.image_size = hp.image_size
        self.patch_size = hp.patch_size
        t = mm.tensors
        f32 = torch.float32

        def w(name: str) -> torch.Tensor:   # matmul weight in compute dtype
            return t[name].to(dtype).contiguous()

        def v(name: str) -> torch.Tensor:   # vector (bias / norm) in float32
            return t[name].to(f32).contiguous()

        # Biases of matmuls live in the compute dtype (added inside the fused linear).
        def b(name: str) -> torch.Tensor:
            return t[name].to(dtype).contiguous()

        d, p = hp.n_embd, hp.patch_size
        self.patch_w = t[V_PATCH_EMBD + ".weight"].reshape(d, 3 * p * p).to(dtype).contiguous()
        self.patch_b = b(V_PATCH_EMBD + ".bias")
        self.pos_embd = v(V_POS_EMBD + ".weight")
        self.blocks: list[Block] = []
        for i in range(hp.n_layer):
            n = lambda kind, s: v_blk(kind, i) + s  # noqa: E731
            qkv_w = torch.cat([t[n(k, ".weight")] for k in ("attn_q", "attn_k", "attn_v")])
            qkv_b = torch.cat([t[n(k, ".bias")] for k in ("attn_q", "attn_k", "attn_v")])
            self.blocks.append(Block(
                ln1_w=v(n("ln1", ".weight")), ln1_b=v(n("ln1", ".bias")),
                qkv_w=qkv_w.to(dtype).contiguous(), qkv_b=qkv_b.to(dtype).contiguous(),
                out_w=w(n("attn_out", ".weight")), out_b=b(n("attn_out", ".bias")),
                ln2_w=v(n("ln2", ".weight")), ln2_b=v(n("ln2", ".bias")),
                fc1_w=w(n("ffn_up", ".weight")), fc1_b=b(n("ffn_up", ".bias")),
                fc2_w=w(n("ffn_down", ".weight")), fc2_b=b(n("ffn_down", ".bias")),
            ))
        self.post_ln_w, self.post_ln_b = v(V_POST_LN + ".weight"), v(V_POST_LN + ".bias")

        self.kv_w = w(R_KV + ".weight")
        self.ln_kv_w, self.ln_kv_b = v(R_LN_KV + ".weight"), v(R_LN_KV + ".bias")
        self.k_w, self.k_b = w(R_ATTN_K + ".weight"), b(R_ATTN_K + ".bias")
        self.v_w, self.v_b = w(R_ATTN_V + ".weight"), b(R_ATTN_V + ".bias")
        self.o_w, self.o_b = w(R_ATTN_OUT + ".weight"), b(R_ATTN_OUT + ".bias")
        self.ln_post_w, self.ln_post_b = v(R_LN_POST + ".weight"), v(R_LN_POST + ".bias")
        self.proj_w = w(R_PROJ + ".weight")   # [out, in]: x @ proj_hf == F.linear(x, proj_w)
        # The queries do not depend on the input: ln_q(query) @ Wq^T + bq once, in float32.
        with torch.inference_mode():
            q = F.layer_norm(t[R_QUERY], (hp.embed_dim,), t[R_LN_Q + ".weight"], t[R_LN_Q + ".bias"], hp.eps)
            q = F.linear(q, t[R_ATTN_Q + ".weight"], t[R_ATTN_Q + ".bias"])
        h = hp.n_head_resampler
        self.q_heads = q.reshape(hp.query_num, h, hp.embed_dim // h).transpose(0, 1).contiguous()  # f32

    # ----------------------------------------------------------------------- construction

    @classmethod
    def load(cls, mmproj_path: str | os.PathLike, *, dtype: str = "auto",
             n_threads: int | None = None) -> "VisionEncoder":
        cdtype = _resolve_dtype(dtype)
        if n_threads is not None and n_threads < 1:
            raise VisionInputError(f"n_threads: {n_threads} must be >= 1")
        mm = load_mmproj(mmproj_path)
        enc = cls(mm, cdtype, n_threads or physical_cores())
        return enc

    @property
    def weights_nbytes(self) -> int:
        """Resident bytes of the loaded weights (tower, position table, resampler, cached queries)."""
        tensors = [self.patch_w, self.patch_b, self.pos_embd, self.post_ln_w, self.post_ln_b,
                   self.kv_w, self.ln_kv_w, self.ln_kv_b, self.k_w, self.k_b, self.v_w, self.v_b,
                   self.o_w, self.o_b, self.ln_post_w, self.ln_post_b, self.proj_w, self.q_heads]
        for blk in self.blocks:
            tensors += list(vars(blk).values())
        return sum(x.numel() * x.element_size() for x in tensors)

    # ----------------------------------------------------------------------- public API

    def encode_slices(self, pixels: list[np.ndarray],
                      temporal_ids: list[list[int]] | None = None) -> np.ndarray:
        """Normalized [3, H, W] float32 slices (H, W multiples of the patch size) -> [G, 64, D]
        float32, one row per group: each slice alone without `temporal_ids`; with them, one group
        per list (consecutive slices, frame-major, id -1 = no temporal term)."""
        sizes = self._check_pixels(pixels)
        groups = self._check_groups(temporal_ids, len(pixels))
        out = []
        with _threads(self.n_threads), torch.inference_mode():
            for chunk in _chunk_groups(groups, sizes, MAX_BATCH_TOKENS):
                first = chunk[0][0]
                last = chunk[-1][0] + len(chunk[-1][1])
                feats = self._tower(pixels[first:last], sizes[first:last])
                rel = [(s - first, ids) for s, ids in chunk]
                out.append(self._resample(feats, sizes[first:last], rel, temporal_ids is not None))
        return torch.cat(out).float().numpy()

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
            ids = [int(t) for t in g]
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
        p, d, nh = hp.patch_size, hp.n_embd, hp.n_head
        lens = [h * w for h, w in sizes]
        B, Lmax, N = len(lens), max(lens), sum(lens)
        patches = torch.cat([
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            .reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)
            for a, (h, w) in zip(pixels, sizes)])
        ids = torch.cat([navit_position_ids(h, w, hp.pos_buckets) for h, w in sizes])
        x = F.linear(patches.to(dt), self.patch_w, self.patch_b).float() + self.pos_embd[ids]

        # Packed row r of slice b sits at padded row b*Lmax + l.
        uniform = all(n == Lmax for n in lens)
        if not uniform:
            pad_idx = torch.cat([torch.arange(n) + b * Lmax for b, n in enumerate(lens)])
            mask = torch.zeros(B, 1, 1, Lmax, dtype=torch.bool)
            for b, n in enumerate(lens):
                mask[b, 0, 0, :n] = True
        for blk in self.blocks:
            y = F.layer_norm(x, (d,), blk.ln1_w, blk.ln1_b, hp.eps).to(dt)
            qkv = F.linear(y, blk.qkv_w, blk.qkv_b)                      # [N, 3d]
            if uniform:
                qkv = qkv.view(B, Lmax, 3, nh, d // nh)
            else:
                padded = qkv.new_zeros(B * Lmax, 3 * d)
                padded[pad_idx] = qkv
                qkv = padded.view(B, Lmax, 3, nh, d // nh)
            # float32 attention: torch's CPU flash kernel is no faster in bf16 at head_dim 72
            q, k, v = _heads_f32(qkv.permute(2, 0, 3, 1, 4)).unbind(0)   # [B, nh, Lmax, hd]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if uniform else mask)
            a = a.transpose(1, 2).reshape(B * Lmax, d)
            if not uniform:
                a = a[pad_idx]
            x = x + F.linear(a.to(dt), blk.out_w, blk.out_b)
            y = F.layer_norm(x, (d,), blk.ln2_w, blk.ln2_b, hp.eps).to(dt)
            y = F.gelu(F.linear(y, blk.fc1_w, blk.fc1_b), approximate="tanh")
            x = x + F.linear(y, blk.fc2_w, blk.fc2_b)
        return F.layer_norm(x, (d,), self.post_ln_w, self.post_ln_b, hp.eps)

    # ----------------------------------------------------------------------- resampler

    def _resample(self, feats: torch.Tensor, sizes: list[tuple[int, int]],
                  groups: list[tuple[int, list[int]]], temporal: bool) -> torch.Tensor:
        """Packed tower output of the slices in `groups` -> [G, query_num, D]."""
        hp, dt = self.hparams, self.dtype
        D, H = hp.embed_dim, hp.n_head_resampler
        lens = [h * w for h, w in sizes]
        x = F.layer_norm(F.linear(feats.to(dt), self.kv_w).float(), (D,), self.ln_kv_w, self.ln_kv_b, hp.eps)
        keys = x + torch.cat([pos_embed_2d(h, w, D) for h, w in sizes])
        if temporal:
            ids = [t for _, g in groups for t in g]
            if any(t >= 0 for t in ids):
                rows = temporal_embed([max(t, 0) for t in ids], D)
                rows[torch.tensor([t < 0 for t in ids])] = 0.0
                keys = keys + torch.repeat_interleave(rows, torch.tensor(lens), dim=0)
        k = F.linear(keys.to(dt), self.k_w, self.k_b)
        v = F.linear(x.to(dt), self.v_w, self.v_b)

        # Each group's keys are one contiguous run of packed rows (its frames, frame-major).
        offs = np.cumsum([0] + lens)
        spans = [(int(offs[s]), int(offs[s + len(g)])) for s, g in groups]
        G, Kmax = len(spans), max(e - s for s, e in spans)
        hd = D // H
        if all(e - s == Kmax for s, e in spans):
            kh = k.view(G, Kmax, H, hd).transpose(1, 2)
            vh = v.view(G, Kmax, H, hd).transpose(1, 2)
            mask = None
        else:
            kh = k.new_zeros(G, Kmax, D)
            vh = v.new_zeros(G, Kmax, D)
            mask = torch.zeros(G, 1, 1, Kmax, dtype=torch.bool)
            for g, (s, e) in enumerate(spans):
                kh[g, :e - s] = k[s:e]
                vh[g, :e - s] = v[s:e]
                mask[g, 0, 0, :e - s] = True
            kh = kh.view(G, Kmax, H, hd).transpose(1, 2)
            vh = vh.view(G, Kmax, H, hd).transpose(1, 2)
        q = self.q_heads.unsqueeze(0).expand(G, -1, -1, -1)
        a = F.scaled_dot_product_attention(q, _heads_f32(kh), _heads_f32(vh), attn_mask=mask)
        a = a.transpose(1, 2).reshape(G * hp.query_num, D)
        out = F.linear(a.to(dt), self.o_w, self.o_b).float()
        out = F.layer_norm(out, (D,), self.ln_post_w, self.ln_post_b, hp.eps)
        return F.linear(out.to(dt), self.proj_w).float().view(G, hp.query_num, D)


# --------------------------------------------------------------------------- helpers

def _heads_f32(x: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 copy of a permuted head view (one pass: layout + dtype)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x)
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
