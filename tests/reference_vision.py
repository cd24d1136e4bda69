"""Independent torch implementation of MiniCPM-V 4.5's vision path (the test oracle).

Written from docs/reference-model.md §2-§3 (the project's description of the reference model),
operating on the Hugging Face checkpoint tensors by their HF names; it shares no code with the
converter or the runtime. Everything runs on the CPU in float32 (the reference's own precision) or float64.

    ref = ReferenceVision(ckpt_dir)                  # dtype=torch.float64 for a tighter oracle
    px = [to_pixels(rgb_uint8_hxwx3), ...]           # normalized [3, H, W], H and W multiples of 14
    feats = ref.vision(px)                           # list of [h*w, Hv] (post-LN tower output)
    out = ref.resample(feats, [(h, w), ...], None)   # [G, 64, D]
    out = ref.embed(px, temporal_ids=None)           # both; None = every slice its own group [-1]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from minicpmv.convert.checkpoint import Checkpoint
from minicpmv.convert.config import load_config

VISION_BATCH = 16  # the reference runs the tower on chunks of 16 slices (vision_batch_size)
RESAMPLER_HEAD_DIM = 128  # num_heads = embed_dim // 128


def to_pixels(rgb: np.ndarray, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W], (x/255 - mean)/std (docs/reference-model.md §4.4)."""
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    x = (x - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def navit_bucket_coords(n: int, buckets: int = 70) -> torch.Tensor:
    """Bucket index of each of n patch rows (or columns), with the reference's float32 arithmetic:
    a float32 step 1/n from an int32 count, torch.arange up to 1 - 1e-6, bucketize right=True
    against arange(1/70, 1, 1/70) (docs/reference-model.md §2.3). Not always floor(70*i/n)
    (docs/pitfalls.md §1)."""
    boundaries = torch.arange(1 / buckets, 1.0, 1 / buckets)
    step = 1 / torch.tensor(n, dtype=torch.int32)
    frac = torch.arange(0, 1 - 1e-6, step)
    return torch.bucketize(frac, boundaries, right=True)


def navit_position_ids(h: int, w: int, buckets: int = 70, bucket_coords=navit_bucket_coords) -> torch.Tensor:
    """[h*w] position-table rows of an h x w patch grid, row-major."""
    bh, bw = bucket_coords(h, buckets), bucket_coords(w, buckets)
    return (bh[:, None] * buckets + bw[None, :]).flatten()


def _sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    """float32 [..., dim]: sin(pos*omega) for all omega, then cos; omega_k = 1/10000^(k/(dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.asarray(pos, dtype=np.float32)[..., None] * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def pos_embed_2d(dim: int, h: int, w: int) -> np.ndarray:
    """float32 [h, w, dim]: first half encodes the column index, second half the row
    (docs/reference-model.md §3.2)."""
    cols = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :], (h, w))
    rows = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (h, w))
    return np.concatenate([_sincos(dim // 2, cols), _sincos(dim // 2, rows)], axis=-1)


def temporal_embed(dim: int, t: int) -> np.ndarray:
    """float32 [dim]: the temporal table row for id t (docs/reference-model.md §3.3)."""
    return _sincos(dim, np.array([t], dtype=np.float32))[0]


class ReferenceVision:
    def __init__(
        self,
        ckpt_dir: Path | str,
        dtype: torch.dtype = torch.float32,
        bucket_coords: Callable[[int, int], torch.Tensor] = navit_bucket_coords,
    ):
        """bucket_coords(n, buckets) -> [n] bucket per patch row/column; replace it to emulate a
        different position rule (e.g. llama.cpp's floor(70*i/n))."""
        self.bucket_coords = bucket_coords
        self.cfg = load_config(Path(ckpt_dir))
        self.dtype = dtype
        ck = Checkpoint(Path(ckpt_dir))
        self.w = {n: torch.from_numpy(ck.f32(n)).to(dtype) for n in ck.names() if n.startswith(("vpm.", "resampler."))}
        ck.close()
        v = self.cfg.vision
        self.patch = v.patch_size
        self.buckets = v.image_size // v.patch_size
        self.n_layers = self.cfg.vision_layers_used
        self.eps = v.layer_norm_eps
        self.embed_dim = self.cfg.text.hidden_size

    # -- vision tower (docs/reference-model.md §2) ----------------------------------------------

    def _strip(self, px: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [3, 14, L*14]: the patches side by side in raster order
        (docs/reference-model.md §2.1)."""
        p = self.patch
        cols = F.unfold(px[None], kernel_size=p, stride=p)[0]  # [3*p*p, L]
        L = cols.shape[1]
        return cols.reshape(3, p, p, L).permute(0, 1, 3, 2).reshape(3, p, L * p)

    def vision(self, pixel_slices: list[np.ndarray]) -> list[torch.Tensor]:
        """Post-LN tower output [h*w, Hv] per slice; slices padded and batched as the reference."""
        p = self.patch
        sizes = [(s.shape[1] // p, s.shape[2] // p) for s in pixel_slices]
        for s, (h, w) in zip(pixel_slices, sizes):
            assert s.shape[0] == 3 and s.shape[1] == h * p and s.shape[2] == w * p, s.shape
        strips = [self._strip(torch.as_tensor(np.asarray(s)).to(self.dtype)) for s in pixel_slices]
        out: list[torch.Tensor] = []
        for start in range(0, len(strips), VISION_BATCH):
            out += self._tower(strips[start : start + VISION_BATCH], sizes[start : start + VISION_BATCH])
        return out

    def _tower(self, strips: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        p, W = self.patch, self.w
        B = len(strips)
        # flatten each strip to [3*14, L*14], pad along the patch axis, restore [B, 3, 14, Lmax*14]
        flat = [s.reshape(3 * p, -1).T for s in strips]
        packed = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=0.0)
        packed = packed.permute(0, 2, 1).reshape(B, 3, p, -1)
        Lmax = packed.shape[-1] // p
        lens = torch.tensor([h * w for h, w in sizes])
        valid = torch.arange(Lmax)[None, :] < lens[:, None]  # [B, Lmax]

        x = F.conv2d(
            packed, W["vpm.embeddings.patch_embedding.weight"], W["vpm.embeddings.patch_embedding.bias"], stride=p
        )  # [B, Hv, 1, Lmax]
        x = x.flatten(2).transpose(1, 2)  # [B, Lmax, Hv]
        pos = torch.zeros(B, Lmax, dtype=torch.long)  # padding keeps id 0
        for b, (h, w) in enumerate(sizes):
            pos[b, : h * w] = navit_position_ids(h, w, self.buckets, self.bucket_coords)
        x = x + W["vpm.embeddings.position_embedding.weight"][pos]

        mask = None
        if not bool(valid.all()):  # additive key mask, only when some slice is padded
            mask = torch.zeros(B, 1, Lmax, Lmax, dtype=self.dtype)
            mask.masked_fill_(~valid[:, None, None, :], torch.finfo(self.dtype).min)
        for i in range(self.n_layers):
            x = self._layer(x, f"vpm.encoder.layers.{i}.", mask)
        x = F.layer_norm(x, x.shape[-1:], W["vpm.post_layernorm.weight"], W["vpm.post_layernorm.bias"], self.eps)
        return [x[b, : h * w] for b, (h, w) in enumerate(sizes)]

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _layer(self, x: torch.Tensor, pre: str, mask: torch.Tensor | None) -> torch.Tensor:
        W, eps = self.w, self.eps
        n_head = self.cfg.vision.num_attention_heads
        B, L, Hv = x.shape
        hd = Hv // n_head
        h = F.layer_norm(x, (Hv,), W[pre + "layer_norm1.weight"], W[pre + "layer_norm1.bias"], eps)
        q, k, v = (
            self._lin(h, pre + f"self_attn.{n}_proj").view(B, L, n_head, hd).transpose(1, 2) for n in ("q", "k", "v")
        )
        att = (q @ k.transpose(-1, -2)) * hd**-0.5
        if mask is not None:
            att = att + mask
        # the reference's softmax runs in float32 at least (a no-op for float32 / float64 weights)
        att = torch.softmax(att, dim=-1, dtype=torch.promote_types(self.dtype, torch.float32)).to(self.dtype)
        o = (att @ v).transpose(1, 2).reshape(B, L, Hv)
        x = x + self._lin(o, pre + "self_attn.out_proj")
        h = F.layer_norm(x, (Hv,), W[pre + "layer_norm2.weight"], W[pre + "layer_norm2.bias"], eps)
        h = self._lin(F.gelu(self._lin(h, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        return x + h

    # -- resampler (docs/reference-model.md §3.4-§3.5, batched path) ----------------------------

    def resample(
        self,
        features: list[torch.Tensor],
        tgt_sizes: list[tuple[int, int]],
        temporal_ids: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """[G, 64, D]. temporal_ids: groups of consecutive slices (flattened length = #slices); each
        group's keys are concatenated frame-major into one attention; id -1 = no temporal term."""
        W, D, eps = self.w, self.embed_dim, self.eps
        B = len(features)
        assert len(tgt_sizes) == B
        if temporal_ids is None:
            temporal_ids = [[-1] for _ in range(B)]
        flat_ids = [t for g in temporal_ids for t in g]
        assert len(flat_ids) == B, "temporal_ids must cover every slice exactly once"
        lens = [h * w for h, w in tgt_sizes]
        Lmax = max(lens)
        pad = torch.zeros(B, Lmax, dtype=torch.bool)  # True = ignore
        for b, n in enumerate(lens):
            pad[b, n:] = True
        x = torch.nn.utils.rnn.pad_sequence([f.to(self.dtype) for f in features], batch_first=True)
        x = F.linear(x, W["resampler.kv_proj.weight"])  # no bias
        x = F.layer_norm(x, (D,), W["resampler.ln_kv.weight"], W["resampler.ln_kv.bias"], eps)
        pos = torch.nn.utils.rnn.pad_sequence(
            [torch.from_numpy(pos_embed_2d(D, h, w).reshape(h * w, D)).to(self.dtype) for h, w in tgt_sizes],
            batch_first=True,
        )
        v = x
        k = x + pos  # positions on KEYS only
        tvec = torch.stack(
            [
                torch.zeros(D, dtype=self.dtype) if t == -1 else torch.from_numpy(temporal_embed(D, t)).to(self.dtype)
                for t in flat_ids
            ]
        )
        k = k + tvec[:, None, :]

        # one attention per group: its slices' keys concatenated frame-major, padded across groups
        ks, vs, ms, start = [], [], [], 0
        for g in temporal_ids:
            end = start + len(g)
            ks.append(k[start:end].reshape(-1, D))
            vs.append(v[start:end].reshape(-1, D))
            ms.append(pad[start:end].reshape(-1))
            start = end
        k = torch.nn.utils.rnn.pad_sequence(ks, batch_first=True)
        v = torch.nn.utils.rnn.pad_sequence(vs, batch_first=True)
        m = torch.nn.utils.rnn.pad_sequence(ms, batch_first=True, padding_value=True)

        q = F.layer_norm(W["resampler.query"], (D,), W["resampler.ln_q.weight"], W["resampler.ln_q.bias"], eps)
        out = self._mha(q, k, v, m)  # [G, 64, D]
        out = F.layer_norm(out, (D,), W["resampler.ln_post.weight"], W["resampler.ln_post.bias"], eps)
        return out @ W["resampler.proj"]

    def _mha(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """torch.nn.MultiheadAttention semantics: packed in_proj (q|k|v rows), q scaled by
        1/sqrt(head_dim) before QK^T, ignored keys get -inf, then out_proj."""
        W, D = self.w, self.embed_dim
        G, Lk, _ = k.shape
        nh = D // RESAMPLER_HEAD_DIM
        hd = D // nh
        wq, wk, wv = W["resampler.attn.in_proj_weight"].chunk(3, dim=0)
        bq, bk, bv = W["resampler.attn.in_proj_bias"].chunk(3, dim=0)
        Q = F.linear(q, wq, bq).view(-1, nh, hd).transpose(0, 1)  # [nh, 64, hd]
        K = F.linear(k, wk, bk).view(G, Lk, nh, hd).transpose(1, 2)  # [G, nh, Lk, hd]
        V = F.linear(v, wv, bv).view(G, Lk, nh, hd).transpose(1, 2)
        att = (Q[None] * math.sqrt(1.0 / hd)) @ K.transpose(-1, -2)  # [G, nh, 64, Lk]
        att = att.masked_fill(ignore[:, None, None, :], float("-inf"))
        att = torch.softmax(att, dim=-1)
        o = (att @ V).transpose(1, 2).reshape(G, -1, D)
        return F.linear(o, W["resampler.attn.out_proj.weight"], W["resampler.attn.out_proj.bias"])

    # -- both ----------------------------------------------------------------------------------

    def embed(self, pixel_slices: list[np.ndarray], temporal_ids: list[list[int]] | None = None) -> torch.Tensor:
        p = self.patch
        sizes = [(s.shape[1] // p, s.shape[2] // p) for s in pixel_slices]
        with torch.no_grad():
            return self.resample(self.vision(pixel_slices), sizes, temporal_ids)
