"""The vision encoder's weights in its compute dtype: matmul weights as `Linear`s (packed for oneDNN
where torch has it), one tower `Block` per layer, the resampler's matrices, and reading them from the
mmproj's open file on demand for the streamed (low-memory) profile.

Every builder takes `take(name) -> float32 tensor` (numpy shape order, our tensor names): the
loaded mmproj at load time, or `FileTensors.take` for a streamed read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minicpmv.schema import R_ATTN_K, R_ATTN_OUT, R_ATTN_Q, R_ATTN_V, R_KV, R_LN_KV, R_LN_Q, R_PROJ, R_QUERY, v_blk

from .mmproj import TensorLocation, VisionHParams, read_tensor
from .model_file import ModelFile

Take = Callable[[str], torch.Tensor]
Norms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # ln1 w, b, ln2 w, b

# Pre-pack matmul weights into oneDNN's blocked layout (what torch's inductor does when freezing):
# measurably faster than F.linear in bf16 and f32 on AVX-512, and fc1 gets GELU fused. Falls back
# to F.linear when this torch build lacks the ops.
USE_ONEDNN_PACKING = True


def pack_linears(dtype: torch.dtype) -> bool:
    """Whether matmul weights are packed for oneDNN (USE_ONEDNN_PACKING and this torch can)."""
    return USE_ONEDNN_PACKING and onednn_available(dtype)


@functools.lru_cache(maxsize=4)
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears work here for `dtype` (tried once on a tiny layer)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.ones(8, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
        y = torch.ops.mkldnn._linear_pointwise(
            x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "gelu", [], "tanh"
        )
        return tuple(y.shape) == (2, 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Linear:
    """y = x @ w.T + b (optionally tanh-GELU) on 2-D inputs in the compute dtype."""

    def __init__(
        self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, gelu: bool = False, pack: bool = False
    ):
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
    qkv: Linear  # q|k|v fused: [3d, d], the attention scale folded into q
    out: Linear
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1: Linear  # with tanh GELU
    fc2: Linear


@dataclass
class ResamplerWeights:
    """The resampler's two output matrices, resident or read per chunk (the rest is `ResamplerFold`)."""

    o: Linear
    proj: Linear  # [out, in]: x @ proj_hf == F.linear(x, proj.weight)

    @property
    def nbytes(self) -> int:
        return self.o.nbytes + self.proj.nbytes


@dataclass
class ResamplerFold:
    """The resampler's attention folded onto the tower's features (`fold_resampler`): always resident."""

    scores: Linear  # tower features [N, C] -> the keys' LayerNorm part of the scores, before 1/std: [H*Q, C]
    pos_cols: Linear  # the first D/2 channels of a key's position (or temporal) row -> scores: [H*Q, D/2]
    pos_rows: Linear  # the last D/2 channels -> scores: [H*Q, D/2]
    gram: torch.Tensor  # [C, C] float32: var of a kv row = f . (gram f) for its features f
    values: torch.Tensor  # [H, C, hd]: per head, weighted features -> values
    values_bias: torch.Tensor  # [H, 1, hd]

    @property
    def nbytes(self) -> int:
        tensors = (self.gram, self.values, self.values_bias)
        return self.scores.nbytes + self.pos_cols.nbytes + self.pos_rows.nbytes + sum(t.nbytes for t in tensors)


class FileTensors:
    """`take(name)` for weights read again from the mmproj's open file (positioned reads through the
    page cache, so between passes nothing of them stays in the process); f16 matrices are converted
    straight to the compute dtype (no float32 copy)."""

    def __init__(self, file: ModelFile, locs: dict[str, TensorLocation]):
        self.file, self.locs = file, locs

    def take(self, name: str) -> torch.Tensor:
        if self.file.fd is None:
            raise OSError(f"{self.file.path}: the vision encoder was closed")
        return read_tensor(self.file.fd, self.locs[name])


def linear(take: Take, base: str, dtype: torch.dtype, pack: bool, bias: bool = True, gelu: bool = False) -> Linear:
    return Linear(take(base + ".weight"), take(base + ".bias") if bias else None, dtype, gelu, pack)


def tower_block(i: int, take: Take, hp: VisionHParams, norms: Norms, dtype: torch.dtype, pack: bool) -> Block:
    """Tower block i; q|k|v fused, with the attention scale 1/sqrt(head_dim) folded into the q rows."""
    bases = [v_blk(k, i) for k in ("attn_q", "attn_k", "attn_v")]
    w = torch.cat([take(b + ".weight") for b in bases]).float()  # the scale is folded in float32
    b = torch.cat([take(b + ".bias") for b in bases]).float()
    scale = (hp.n_embd // hp.n_head) ** -0.5
    w[: hp.n_embd] *= scale
    b[: hp.n_embd] *= scale
    ln1_w, ln1_b, ln2_w, ln2_b = norms
    return Block(
        ln1_w=ln1_w,
        ln1_b=ln1_b,
        qkv=Linear(w, b, dtype, pack=pack),
        out=linear(take, v_blk("attn_out", i), dtype, pack),
        ln2_w=ln2_w,
        ln2_b=ln2_b,
        fc1=linear(take, v_blk("ffn_up", i), dtype, pack, gelu=True),
        fc2=linear(take, v_blk("ffn_down", i), dtype, pack),
    )


def resampler_weights(take: Take, dtype: torch.dtype, pack: bool) -> ResamplerWeights:
    return ResamplerWeights(o=linear(take, R_ATTN_OUT, dtype, pack), proj=linear(take, R_PROJ, dtype, pack, bias=False))


def fold_resampler(take: Take, hp: VisionHParams, dtype: torch.dtype, pack: bool) -> ResamplerFold:
    """The resampler's cross-attention as products on the tower's features f [N, C] (C = tower width).

    The reference (docs/reference-model.md §3): x = LN_kv(Wkv f), keys = x + pos (+ temporal),
    values = x; per head h, scores_h = q_h . (Wk_h key + bk_h) / sqrt(hd) with q = Wq LN_q(query) + bq,
    out_h = softmax(scores_h) (Wv_h x + bv_h). The queries do not depend on the input, so with
    A_h = Wk_h^T q_h / sqrt(hd) (bk_h drops out: a per-query constant cancels in the softmax):
      scores = x A + pos A.
    LN_kv(Wkv f) = (Wc f / std) * w + b with Wc = Wkv minus the mean of its rows (that centres each
    kv row) and std^2 = f . (Wc^T Wc / D) f + eps; b A is again a per-query constant, so
      scores = (f (Wc^T diag(w) A)) / std + pos A,
    and as the softmax weights P of a query sum to 1,
      out_h = (sum_n P_n f_n / std_n) (Wc^T diag(w) Wv_h^T) + (Wv_h b + bv_h).
    Same result up to rounding, for a third of the products (18 instead of 50 GFLOP per 1,024
    patches at MiniCPM-V 4.5's shapes): nothing D = 4096 wide is made per patch. The matrices are
    combined in float32 and rounded once to the compute dtype."""
    Q, H, D = hp.query_num, hp.n_head_resampler, hp.embed_dim
    hd = D // H
    with torch.inference_mode():
        q = F.layer_norm(take(R_QUERY), (D,), take(R_LN_Q + ".weight"), take(R_LN_Q + ".bias"), hp.eps)
        q = F.linear(q, take(R_ATTN_Q + ".weight"), take(R_ATTN_Q + ".bias"))  # [Q, D]
        wk = take(R_ATTN_K + ".weight").view(H, hd, D)
        take(R_ATTN_K + ".bias")  # consumed: cancels in the softmax
        a = torch.bmm(q.view(Q, H, hd).transpose(0, 1), wk).reshape(H * Q, D) * hd**-0.5  # [H*Q, D]
        wkv = take(R_KV + ".weight")  # [D, C]
        wc = wkv - wkv.mean(0)
        del wkv
        w, b = take(R_LN_KV + ".weight"), take(R_LN_KV + ".bias")
        wv = take(R_ATTN_V + ".weight")  # [H*hd, D]
        bv = take(R_ATTN_V + ".bias").view(H, 1, hd)
        values = ((wv * w) @ wc).view(H, hd, -1).transpose(1, 2)  # [H, C, hd]
        values_bias = (wv @ b).view(H, 1, hd) + bv
        del wv
        half = D // 2
        return ResamplerFold(
            scores=Linear((a * w) @ wc, None, dtype, pack=pack),
            pos_cols=Linear(a[:, :half].contiguous(), None, dtype, pack=pack),
            pos_rows=Linear(a[:, half:].contiguous(), None, dtype, pack=pack),
            gram=wc.T @ wc / D,
            values=values.to(dtype).contiguous(),
            values_bias=values_bias.to(dtype),
        )
