"""Importance-matrix statistics from llama.cpp's eval callback, as `llama-imatrix` collects them.

llama.cpp calls the callback for every node of the graph it computes, first with ask=True ("do you
want this node's data?"), then, for a yes, with ask=False once the node is computed. The definition
followed is IMatrixCollector::collect_imatrix (tools/imatrix/imatrix.cpp of the pinned llama.cpp):
- a node is wanted if it is a MUL_MAT whose weight (src[0]) is named `blk.*` (or `output.weight`
  with process_output), whose input (src[1]) is F32 and holds at least 16 rows: llama-imatrix
  ignores smaller batches, so a decode of fewer than 16 positions contributes nothing;
- for the weight's name (the part between '#' when a backend decorated it), it adds every input
  row's squares x_j^2 to a per-column sum (one sum per matrix of a 3-D weight: row r of the input's
  matrix i2 goes to weight matrix i2 mod ne2) and adds rows / n_mat to the weight's count.
The sums are accumulated in float64 here (llama-imatrix adds float32s one row at a time; float64
keeps millions of calibration tokens exact to float32 output precision). Models with experts
(MUL_MAT_ID) are not handled: MiniCPM-V's language model is dense.

A callback must not raise into C: the first error is kept, the computation is stopped, and
`check()` raises it after llama_decode returns. Statistics of a calibration item go to `pending`
and only join the totals when the item succeeds (`commit`), so a failed item leaves no trace.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from . import ggml

MIN_ROWS = 16  # llama-imatrix: "why are small batches ignored (<16 tokens)?"
_F32 = 0  # GGML_TYPE_F32


@dataclass
class Stats:
    """Per weight name: float64 sums of squared inputs [n_mat, n_cols] and int64 counts [n_mat]."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, other: "Stats") -> None:
        for name, s in other.sums.items():
            if name in self.sums:
                if self.sums[name].shape != s.shape:
                    raise ValueError(
                        f"importance matrix entry {name} has {self.sums[name].size} values, "
                        f"the model gives {s.size}: not the same model"
                    )
                self.sums[name] = self.sums[name] + s
                self.counts[name] = self.counts[name] + other.counts[name]
            else:
                self.sums[name], self.counts[name] = s.copy(), other.counts[name].copy()


class ImatrixCollector:
    """Callable for `ContextParams(cb_eval=...)`: (ggml_tensor address, ask) -> bool."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.totals = Stats()
        self.pending = Stats()
        self.error: BaseException | None = None

    # -- callback ------------------------------------------------------------------------------

    def __call__(self, addr: int, ask: bool) -> bool:
        if self.error is not None:
            return False
        try:
            t = ggml.tensor_at(addr)
            if ask:
                return self._wanted(t)
            self._collect(t)
            return True
        except BaseException as e:  # noqa: BLE001 - must not unwind through C; re-raised by check()
            self.error = e
            return False

    def _wanted(self, t: ggml.Tensor) -> bool:
        if ggml.op_name(t.op) != "MUL_MAT":
            return False
        src0, src1 = ggml.tensor_at(t.src[0]), ggml.tensor_at(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != _F32:
            return False
        name = weight_name(src0.name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _collect(self, t: ggml.Tensor) -> None:
        src0, p1 = ggml.tensor_at(t.src[0]), t.src[1]
        src1 = ggml.tensor_at(p1)
        name = weight_name(src0.name)
        ne0, ne1, ne2, ne3 = (int(v) for v in src1.ne)
        n_mat = int(src0.ne[2] * src0.ne[3])
        x = _view(p1, src1)  # [ne3, ne2, ne1, ne0] float32
        if not np.isfinite(x).all():
            raise ValueError(f"non-finite activations at the input of {name} (the model produces NaN/inf)")
        sq = np.einsum("abij,abij->abj", x, x, dtype=np.float64)  # sum over rows: [ne3, ne2, ne0]
        acc = np.zeros((n_mat, ne0), np.float64)
        for i3 in range(ne3):
            for i2 in range(ne2):
                acc[(i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))] += sq[i3, i2]
        counts = np.full(n_mat, (ne1 * ne2 * ne3) // n_mat, np.int64)  # ggml_nrows(src1) / n_mat
        self.pending.add(Stats({name: acc}, {name: counts}))

    # -- item bookkeeping ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise the error a callback swallowed (then the item's statistics are dropped)."""
        if self.error is not None:
            e, self.error = self.error, None
            self.discard()
            raise e

    def commit(self) -> None:
        self.check()
        self.totals.add(self.pending)
        self.discard()

    def discard(self) -> None:
        self.pending = Stats()


def weight_name(raw: bytes) -> str:
    """filter_tensor_name: 'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight'."""
    s = raw.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#", 2)[1]
    return s


def _view(addr: int, t: ggml.Tensor) -> np.ndarray:
    """A float32 view [ne3, ne2, ne1, ne0] of a tensor's data with its byte strides (a host copy
    first when the data lives in device memory)."""
    ne = [int(v) for v in t.ne]
    nb = [int(v) for v in t.nb]
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
    if ggml.buffer_is_host(t.buffer) and t.data:
        buf = (ctypes.c_char * span).from_address(t.data)
    else:
        host = np.empty(max(span, ggml.nbytes(addr)), np.uint8)
        ggml.tensor_get(addr, host.ctypes.data, ggml.nbytes(addr))
        buf = host
    if nb[0] != 4:
        raise ValueError(f"matmul input {weight_name(t.name)} is not a contiguous float32 row")
    return np.ndarray((ne[3], ne[2], ne[1], ne[0]), np.float32, buffer=buf, strides=(nb[3], nb[2], nb[1], nb[0]))
