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

from minicpmv.schema import R_ATTN_K, R_ATTN_OUT, R_ATTN_Q, R_ATTN_V, R_KV, R_LN_Q, R_PROJ, R_QUERY, v_blk

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
    """The resampler's big matrices (the folded score matrix is derived, see `folded_scores`)."""

    kv: Linear  # tower width -> D, no bias
    wv_t: torch.Tensor  # [H, D, hd] value projection, transposed per head
    bv: torch.Tensor  # [H, 1, hd]
    o: Linear
    proj: Linear  # [out, in]: x @ proj_hf == F.linear(x, proj.weight)

    @property
    def nbytes(self) -> int:
        t = self.wv_t.numel() * self.wv_t.element_size() + self.bv.numel() * self.bv.element_size()
        return self.kv.nbytes + self.o.nbytes + self.proj.nbytes + t


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


def resampler_weights(take: Take, hp: VisionHParams, dtype: torch.dtype, pack: bool) -> ResamplerWeights:
    H, D = hp.n_head_resampler, hp.embed_dim
    hd = D // H
    return ResamplerWeights(
        kv=linear(take, R_KV, dtype, pack, bias=False),
        wv_t=take(R_ATTN_V + ".weight").view(H, hd, D).transpose(1, 2).to(dtype).contiguous(),
        bv=take(R_ATTN_V + ".bias").view(H, 1, hd).to(dtype),
        o=linear(take, R_ATTN_OUT, dtype, pack),
        proj=linear(take, R_PROJ, dtype, pack, bias=False),
    )


def folded_scores(take: Take, hp: VisionHParams, dtype: torch.dtype, pack: bool) -> Linear:
    """The resampler's attention scores as one matrix on its keys: keys [N, D] -> [N, H*Q].

    The resampler's queries do not depend on the input, so its attention folds into two matmuls on
    the keys' and values' inputs (x = ln_kv output, keys = x + positions):
      scores_h = q_h . (Wk_h key + bk_h) / sqrt(hd) = key . (Wk_h^T q_h / sqrt(hd)) + const,
        and a per-query constant cancels in the softmax, so bk drops out;
      out_h = P_h (x Wv_h^T + bv_h) = (P_h x) Wv_h^T + bv_h, as each row of P_h sums to 1.
    Half the FLOPs of projecting every key and value to D channels, same result."""
    Q, H, D = hp.query_num, hp.n_head_resampler, hp.embed_dim
    hd = D // H
    with torch.inference_mode():
        q = F.layer_norm(take(R_QUERY), (D,), take(R_LN_Q + ".weight"), take(R_LN_Q + ".bias"), hp.eps)
        q = F.linear(q, take(R_ATTN_Q + ".weight"), take(R_ATTN_Q + ".bias"))  # [Q, D]
        wk = take(R_ATTN_K + ".weight").view(H, hd, D)
        take(R_ATTN_K + ".bias")  # consumed: cancels in the softmax
        qk = torch.bmm(q.view(Q, H, hd).transpose(0, 1), wk) * hd**-0.5  # [H, Q, D]
    return Linear(qk.reshape(H * Q, D), None, dtype, pack=pack)
