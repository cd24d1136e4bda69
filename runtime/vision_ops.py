"""The vision encoder's math in torch, one function per step (docs/reference-model.md §2-§3).

- patches: the 14x14 patch convolution as one matmul on flattened patches (`patch_rows`);
- positions: NaViT ids (float32 `arange` + `bucketize` exactly as the reference, which differs from
  floor(70*i/n) for some sides), the resampler's 2-D (as its row and column halves) and temporal
  sin-cos tables;
- a tower block: pre-LN, fused q|k|v, bidirectional attention over each slice's own rows, tanh
  GELU MLP; attention in float32 (padded batch, torch's fused kernel) or bf16 (per slice, a few
  heads per batched product, float32 softmax);
- the resampler, folded onto the tower's features (vision_weights.fold_resampler): scores of the
  features and of the position (+ temporal) rows, one softmax per temporal group, values, ln_post,
  proj.

The residual stream and LayerNorms stay in float32; matmuls run in the compute dtype `dt`.
Module-level so that the dtype probe (vision_dtype.py) times exactly the code the encoder runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from minicpmv.sincos import sincos, sincos_axes

from .mmproj import VisionHParams
from .vision_weights import Block, Linear, ResamplerFold, ResamplerWeights


def patch_rows(pixels: np.ndarray, p: int) -> torch.Tensor:
    """[3, H, W] pixels -> [(H/p)*(W/p), 3*p*p] float32: patches in raster order, each flattened
    (channel, row, col), the layout of the reference's unfold, so the p x p patch convolution is one
    matmul with its weight reshaped to [width, 3*p*p]."""
    _, H, W = pixels.shape
    h, w = H // p, W // p
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return x.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)


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


def pos_embed_axes(h: int, w: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's pos_embed[:h, :w] as its two halves of channels: row r, column c has
    [col_enc[c], row_enc[r]]; returns float32 ([h, D/2] row_enc, [w, D/2] col_enc). Computed for any
    size (the reference grows its table for sides > 70)."""
    row_enc, col_enc = sincos_axes(embed_dim, h, w)
    return torch.from_numpy(row_enc.copy()), torch.from_numpy(col_enc.copy())


def temporal_embed(ids: list[int], embed_dim: int) -> torch.Tensor:
    """[len(ids), D] float32 rows of the reference temporal table (id in 0.1 s units)."""
    return torch.from_numpy(sincos(np.asarray(ids, dtype=np.float32), embed_dim))


# --------------------------------------------------------------------------- a tower block


def block_forward(x: torch.Tensor, blk: Block, lens: list[int], eps: float, dt: torch.dtype, attend) -> None:
    """One pre-LN encoder block on packed float32 rows [N, d], updated in place (the residual adds
    go into x: no new row buffers per layer); matmuls in `dt`."""
    x += attention_half(x, blk.ln1_w, blk.ln1_b, blk.qkv, blk.out, lens, eps, dt, attend)
    y = F.layer_norm(x, (x.shape[1],), blk.ln2_w, blk.ln2_b, eps).to(dt)
    x += blk.fc2(blk.fc1(y))


def attention_half(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    qkv: Linear,
    out: Linear,
    lens: list[int],
    eps: float,
    dt: torch.dtype,
    attend,
) -> torch.Tensor:
    """The attention half of a block's update, out(attention(qkv(LN1(x)))): the caller adds it to x."""
    y = F.layer_norm(x, (x.shape[1],), ln_w, ln_b, eps).to(dt)
    return out(attend(qkv(y), lens))


def attention_for(dt: torch.dtype, n_head: int):
    """The self-attention the tower runs in `dt`: (packed qkv rows, slice lengths) -> [N, d]."""
    if dt == torch.bfloat16:
        return functools.partial(attention_head_groups, n_head=n_head)
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
        mask = mask[:, None, None, :]  # [B, 1, 1, Lmax], True = key
    q, k, v = qkv.view(B, Lmax, 3, nh, d // nh).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if uniform else mask, scale=1.0)
    a = a.transpose(1, 2).reshape(B * Lmax, d)
    return a if uniform else a[pad_idx]


# Heads per batched product in bf16 attention: their scores, 2 bytes x heads x n x n, are one buffer
# for the call (8 MB for a 1,024-patch slice). Fewer, larger products keep all of torch's threads
# busy between fewer barriers (docs/architecture.md, "Where the vision time goes").
HEADS_PER_PRODUCT = 4


def attention_head_groups(qkv: torch.Tensor, lens: list[int], n_head: int) -> torch.Tensor:
    """bf16 self-attention on each slice's own rows (no padding, no mask), HEADS_PER_PRODUCT heads
    at a time: QK^T and PV are batched bf16 matmuls with float32 accumulation, the softmax is
    computed in float32 and rounded to bf16 (as the reference model run in bf16), in place in the
    scores buffer. At head_dim 72 this beats torch's fused attention, which does not use the CPU's
    bf16 dot products. The products use torch's intra-op threads of the calling thread: no threads
    of our own (compute_thread.py)."""
    nh = n_head
    N, d = qkv.shape[0], qkv.shape[1] // 3
    hd = d // nh
    g = min(HEADS_PER_PRODUCT, nh)
    qkv = qkv.view(N, 3, nh, hd)
    q, k = qkv[:, :2].permute(1, 2, 0, 3).contiguous()  # [nh, N, hd] each
    vt = qkv[:, 2].permute(1, 2, 0).contiguous()  # [nh, hd, N]
    out_t = torch.empty(nh, hd, N, dtype=qkv.dtype)  # (P V)^T per head
    scores = torch.empty(g * max(lens) ** 2, dtype=qkv.dtype)
    lo = 0
    for n in lens:
        rows = slice(lo, lo + n)
        for h0 in range(0, nh, g):
            heads = slice(h0, min(h0 + g, nh))
            s = scores[: (heads.stop - h0) * n * n].view(-1, n, n)
            torch.bmm(q[heads, rows], k[heads, rows].transpose(1, 2), out=s)
            torch.ops.aten._softmax.out(s, -1, False, out=s)  # row by row: in place is exact
            torch.bmm(vt[heads, :, rows], s.transpose(1, 2), out=out_t[heads, :, rows])  # V^T P^T
        lo += n
    return out_t.permute(2, 0, 1).reshape(N, d)


# --------------------------------------------------------------------------- the resampler


def resample(
    fold: ResamplerFold,
    r: ResamplerWeights,
    ln_post: tuple[torch.Tensor, torch.Tensor],
    hp: VisionHParams,
    dt: torch.dtype,
    feats: torch.Tensor,
    sizes: list[tuple[int, int]],
    groups: list[tuple[int, list[int]]],
    temporal: bool,
) -> torch.Tensor:
    """Packed float32 tower output of consecutive slices -> [G, query_num, D], one row per group (its
    slices attended jointly; with `temporal`, each slice's keys get its frame's temporal row, id -1
    none). The math is the reference's, folded onto the features (vision_weights.fold_resampler)."""
    D, H, Q = hp.embed_dim, hp.n_head_resampler, hp.query_num
    lens = [h * w for h, w in sizes]
    inv_std = torch.rsqrt((feats @ fold.gram * feats).sum(-1) + hp.eps)  # [N]: 1/std of each kv row
    f = feats.to(dt)
    s = fold.scores(f).float() * inv_std[:, None]  # [N, H*Q]: the keys' LayerNorm part
    pos = []
    for h, w in sizes:  # the position rows' part: row r, column c -> rows[r] + cols[c]
        row_enc, col_enc = pos_embed_axes(h, w, D)
        rows, cols = fold.pos_rows(row_enc.to(dt)).float(), fold.pos_cols(col_enc.to(dt)).float()
        pos.append((rows[:, None] + cols[None]).view(h * w, -1))
    s += torch.cat(pos)
    if temporal:
        ids = [t for _, g in groups for t in g]
        if any(t >= 0 for t in ids):
            t_rows = temporal_embed([max(t, 0) for t in ids], D).to(dt)
            t_scores = fold.pos_cols(t_rows[:, : D // 2]).float() + fold.pos_rows(t_rows[:, D // 2 :]).float()
            t_scores[torch.tensor([t < 0 for t in ids])] = 0.0
            s += torch.repeat_interleave(t_scores, torch.tensor(lens), dim=0)
    # Each group's keys are one contiguous run of packed rows (its frames, frame-major): one
    # attention over exactly those rows, so no padding or mask is needed.
    offs = np.cumsum([0] + lens)
    outs = []
    for first, g in groups:
        lo, hi = int(offs[first]), int(offs[first + len(g)])
        p = torch.softmax(s[lo:hi].t(), dim=-1) * inv_std[lo:hi]  # [H*Q, n], float32 softmax
        pf = torch.mm(p.to(dt), f[lo:hi]).view(H, Q, -1)  # per head, sum_n P_n f_n / std_n
        o = torch.baddbmm(fold.values_bias, pf, fold.values)  # [H, Q, hd]
        outs.append(o.transpose(0, 1).reshape(Q, D))
    out = r.o(torch.cat(outs)).float()  # [G*Q, D]
    out = F.layer_norm(out, (D,), ln_post[0], ln_post[1], hp.eps)
    return r.proj(out.to(dt)).float().view(len(groups), Q, D)
