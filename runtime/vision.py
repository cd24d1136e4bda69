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
key padding mask. In bf16 mode the linear layers and attention take bf16 inputs (oneDNN and
torch's flash attention, both accumulating in float32); the residual stream and LayerNorms stay in
float32.
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

# Pre-pack matmul weights into oneDNN's blocked layout (what torch's inductor does when freezing):
# ~10% faster than F.linear in bf16 and f32 on AVX-512, and fc1 gets GELU fused. Falls back to
# F.linear when this torch build lacks the ops.
USE_ONEDNN_PACKING = True


def _onednn_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and callable(torch.ops.mkldnn._reorder_linear_weight)
                and callable(torch.ops.mkldnn._linear_pointwise))
    except (AttributeError, RuntimeError):
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
        t = mm  # consumed: each tensor is dequantized, converted and dropped in turn (bounds peak memory)
        pack = USE_ONEDNN_PACKING and _onednn_available()
        self.packed = pack

        def vec(name: str) -> torch.Tensor:   # LayerNorm parameters and tables stay float32
            return t.take(name).float().contiguous()

        def lin(base: str, bias: bool = True, gelu: bool = False) -> Linear:
            return Linear(t.take(base + ".weight"), t.take(base + ".bias") if bias else None, dtype, gelu, pack)

        def fused(*bases: str) -> Linear:
            w = torch.cat([t.take(b + ".weight") for b in bases])
            b = torch.cat([t.take(b + ".bias") for b in bases])
            return Linear(w, b, dtype, pack=pack)

        d, p = hp.n_embd, hp.patch_size
        patch_w = t.take(V_PATCH_EMBD + ".weight").reshape(d, 3 * p * p)  # the 14x14 conv as a linear
        self.patch = Linear(patch_w, t.take(V_PATCH_EMBD + ".bias"), dtype, pack=pack)
        self.pos_embd = vec(V_POS_EMBD + ".weight")
        self.blocks: list[Block] = []
        for i in range(hp.n_layer):
            self.blocks.append(Block(
                ln1_w=vec(v_blk("ln1", i) + ".weight"), ln1_b=vec(v_blk("ln1", i) + ".bias"),
                qkv=fused(v_blk("attn_q", i), v_blk("attn_k", i), v_blk("attn_v", i)),
                out=lin(v_blk("attn_out", i)),
                ln2_w=vec(v_blk("ln2", i) + ".weight"), ln2_b=vec(v_blk("ln2", i) + ".bias"),
                fc1=lin(v_blk("ffn_up", i), gelu=True),
                fc2=lin(v_blk("ffn_down", i)),
            ))
        self.post_ln_w, self.post_ln_b = vec(V_POST_LN + ".weight"), vec(V_POST_LN + ".bias")

        # The queries do not depend on the input: ln_q(query) @ Wq^T + bq once, in float32.
        with torch.inference_mode():
            q = F.layer_norm(t.take(R_QUERY), (hp.embed_dim,), t.take(R_LN_Q + ".weight"),
                             t.take(R_LN_Q + ".bias"), hp.eps)
            q = F.linear(q, t.take(R_ATTN_Q + ".weight"), t.take(R_ATTN_Q + ".bias"))
        h = hp.n_head_resampler
        self.q_heads = q.reshape(hp.query_num, h, hp.embed_dim // h).transpose(0, 1).contiguous()
        self.kv = lin(R_KV, bias=False)
        self.ln_kv_w, self.ln_kv_b = vec(R_LN_KV + ".weight"), vec(R_LN_KV + ".bias")
        self.k = lin(R_ATTN_K)
        self.v = lin(R_ATTN_V)
        self.o = lin(R_ATTN_OUT)
        self.ln_post_w, self.ln_post_b = vec(R_LN_POST + ".weight"), vec(R_LN_POST + ".bias")
        self.proj = lin(R_PROJ, bias=False)  # [out, in]: x @ proj_hf == F.linear(x, proj.weight)

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
        """Resident bytes of the loaded weights: matmul weights in the compute dtype, LayerNorm
        parameters and the position table in float32, and the cached float32 queries."""
        linears = [self.patch, self.kv, self.k, self.v, self.o, self.proj]
        vectors = [self.pos_embd, self.post_ln_w, self.post_ln_b, self.ln_kv_w, self.ln_kv_b,
                   self.ln_post_w, self.ln_post_b, self.q_heads]
        for blk in self.blocks:
            linears += [blk.qkv, blk.out, blk.fc1, blk.fc2]
            vectors += [blk.ln1_w, blk.ln1_b, blk.ln2_w, blk.ln2_b]
        return sum(x.nbytes for x in linears) + sum(x.numel() * x.element_size() for x in vectors)

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
        x = self.patch(patches.to(dt)).float() + self.pos_embd[ids]

        # Packed row r of slice b sits at padded row b*Lmax + l.
        uniform = all(n == Lmax for n in lens)
        if not uniform:
            pad_idx = torch.cat([torch.arange(n) + b * Lmax for b, n in enumerate(lens)])
            mask = torch.zeros(B, 1, 1, Lmax, dtype=torch.bool)
            for b, n in enumerate(lens):
                mask[b, 0, 0, :n] = True
        for blk in self.blocks:
            y = F.layer_norm(x, (d,), blk.ln1_w, blk.ln1_b, hp.eps).to(dt)
            qkv = blk.qkv(y)                                              # [N, 3d]
            if uniform:
                qkv = qkv.view(B, Lmax, 3, nh, d // nh)
            else:
                padded = qkv.new_zeros(B * Lmax, 3 * d)
                padded[pad_idx] = qkv
                qkv = padded.view(B, Lmax, 3, nh, d // nh)
            # torch's CPU flash attention accumulates in float32 (scores, softmax, sum) for bf16 too
            q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # [B, nh, Lmax, hd]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if uniform else mask)
            a = a.transpose(1, 2).reshape(B * Lmax, d)
            if not uniform:
                a = a[pad_idx]
            x = x + blk.out(a)
            y = F.layer_norm(x, (d,), blk.ln2_w, blk.ln2_b, hp.eps).to(dt)
            x = x + blk.fc2(blk.fc1(y))
        return F.layer_norm(x, (d,), self.post_ln_w, self.post_ln_b, hp.eps)

    # ----------------------------------------------------------------------- resampler

    def _resample(self, feats: torch.Tensor, sizes: list[tuple[int, int]],
                  groups: list[tuple[int, list[int]]], temporal: bool) -> torch.Tensor:
        """Packed tower output of the slices in `groups` -> [G, query_num, D]."""
        hp, dt = self.hparams, self.dtype
        D, H = hp.embed_dim, hp.n_head_resampler
        lens = [h * w for h, w in sizes]
        x = F.layer_norm(self.kv(feats.to(dt)).float(), (D,), self.ln_kv_w, self.ln_kv_b, hp.eps)
        keys = x + torch.cat([pos_embed_2d(h, w, D) for h, w in sizes])
        if temporal:
            ids = [t for _, g in groups for t in g]
            if any(t >= 0 for t in ids):
                rows = temporal_embed([max(t, 0) for t in ids], D)
                rows[torch.tensor([t < 0 for t in ids])] = 0.0
                keys = keys + torch.repeat_interleave(rows, torch.tensor(lens), dim=0)
        k = self.k(keys.to(dt))
        v = self.v(x.to(dt))

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
        q = self.q_heads.to(dt).unsqueeze(0).expand(G, -1, -1, -1)
        a = F.scaled_dot_product_attention(q, kh.contiguous(), vh.contiguous(), attn_mask=mask)
        a = a.transpose(1, 2).reshape(G * hp.query_num, D)
        out = self.o(a).float()
        out = F.layer_norm(out, (D,), self.ln_post_w, self.ln_post_b, hp.eps)
        return self.proj(out.to(dt)).float().view(G, hp.query_num, D)


# --------------------------------------------------------------------------- helpers


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
