"""A llama.cpp inference context: preallocated batches, decoding token ids and embedding rows at
explicit positions, logits, and the KV cache cut back to a prefix or copied to another context.

Everything per-token is preallocated (one token batch, one embedding batch), so the Python cost of a
decode step is a handful of ctypes stores and one C call.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import llama_cpp as ll
import numpy as np

from minicpmv.cpu import default_threads

from . import compute_thread
from .llama import LlamaModel
from .llama_backend import ContextOverflowError, LlamaError, release

# --------------------------------------------------------------------------- batches


class _Batch:
    """A preallocated llama_batch (tokens, or embedding rows of width n_embd); one sequence per
    position, sequence 0 unless `place` says otherwise."""

    def __init__(self, capacity: int, n_embd: int = 0):
        self.capacity = capacity
        self.n_embd = n_embd
        self.batch = ll.llama_batch_init(capacity, n_embd, 1)
        b = self.batch
        for i in range(capacity):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(capacity,))
        if n_embd:
            self.embd = np.ctypeslib.as_array(b.embd, shape=(capacity, n_embd))
            self.token = None
        else:
            self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
            self.embd = None
        # raw pointers for the one-token fast path (attribute access on the struct allocates)
        self._tok_p, self._pos_p, self._log_p = b.token, b.pos, b.logits
        self.logits_all = False

    def set_one(self, token: int, pos: int) -> None:
        self._tok_p[0] = token
        self._pos_p[0] = pos
        self._log_p[0] = 1
        self.batch.n_tokens = 1

    def fill(self, n: int, pos0: int, logits_last: bool) -> None:
        self.pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.logits[:n] = 1 if self.logits_all else 0
        if logits_last:
            self.logits[n - 1] = 1
        self.batch.n_tokens = n

    def place(self, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray) -> None:
        """Positions, sequence ids and logit flags of the first len(pos) entries (several sequences
        in one batch). Entries later filled by `fill`/`set_one` go back to sequence 0."""
        n = len(pos)
        self.pos[:n] = pos
        self.logits[:n] = logits
        b = self.batch
        for i, s in enumerate(seq.tolist()):
            b.seq_id[i][0] = s
        self._placed = max(getattr(self, "_placed", 0), n)
        self.batch.n_tokens = n

    def reset_seqs(self) -> None:
        """Sequence 0 for every entry `place` changed."""
        b = self.batch
        for i in range(getattr(self, "_placed", 0)):
            b.seq_id[i][0] = 0
        self._placed = 0

    def free(self) -> None:
        if self.batch is not None:  # a struct passed by value: truthy whatever it holds
            ll.llama_batch_free(self.batch)
            self.batch = None


# --------------------------------------------------------------------------- context


@dataclass
class ContextParams:
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None
    embd_rows: int | None = None  # rows per embedding batch (default n_batch)
    kv_type: str = "f16"  # KV cache precision: "f16" (llama.cpp's default), "f32" or "q8_0"
    flash_attn: bool | None = None  # None: llama.cpp decides (on for CPU); its CPU kernel is f16
    # llama.cpp's eval callback (cb_eval): called with (address of a ggml_tensor of the graph, ask)
    # as the graph is computed, see ggml_backend_sched_eval_callback; e.g. quant.imatrix_collect
    cb_eval: Callable[[int, bool], bool] | None = None
    # every decoded position computes its logits; otherwise llama.cpp's last layer keeps only the
    # positions that output (what an eval callback sees of that layer changes with it)
    logits_all: bool = False
    # sequences (runtime/batch.py: one per conversation decoded together); n_ctx is then split
    # evenly between them (llama.cpp's non-unified KV cache: each sequence its own cells)
    n_seq: int = 1


# ggml_type ids. q8_0 halves the cache (llama.cpp quantizes K and V per 32 values; a quantized V
# cache needs flash attention, which is llama.cpp's CPU default).
_KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}
KV_TYPES = tuple(_KV_TYPES)


class LlamaContext:
    """One inference context, with one sequence (id 0) unless ContextParams.n_seq says more;
    positions are managed by the caller."""

    def __init__(self, model: LlamaModel, params: ContextParams | None = None):
        self.model = model
        p = params or ContextParams()
        threads = p.n_threads or default_threads()
        cp = ll.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = min(p.n_batch, p.n_ctx)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = max(1, p.n_seq)
        cp.kv_unified = False  # each sequence its own cells: attention never looks at the others
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = True
        if p.kv_type not in _KV_TYPES:
            raise LlamaError(f"kv_type: {p.kv_type!r} is not one of {', '.join(_KV_TYPES)}")
        cp.type_k = cp.type_v = _KV_TYPES[p.kv_type]
        cp.flash_attn_type = -1 if p.flash_attn is None else int(bool(p.flash_attn))
        if p.kv_type == "q8_0" and p.flash_attn is False:
            raise LlamaError("kv_type q8_0 needs flash attention (flash_attn None or True)")
        # Only the last position's logits are read (unless logits_all): telling llama.cpp so sizes
        # its compute buffer for one output row instead of n_batch rows of the 151k-entry
        # vocabulary (312 -> 108 MiB for the 8B model at n_batch 512).
        cp.n_outputs_max = 0 if p.logits_all else cp.n_seq_max  # one row per sequence in a batch
        self._cb_eval = None
        if p.cb_eval is not None:
            fn = p.cb_eval
            # kept on self: llama.cpp holds the C pointer for the context's lifetime
            self._cb_eval = ll.ggml_backend_sched_eval_callback(lambda t, ask, _ud: bool(fn(t or 0, bool(ask))))
            cp.cb_eval = self._cb_eval
            cp.cb_eval_user_data = None
        self.ctx = ll.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise LlamaError(f"cannot create a llama.cpp context with n_ctx={p.n_ctx} (out of memory?)")
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.n_seq = cp.n_seq_max
        self.n_ctx_seq = ll.llama_n_ctx_seq(self.ctx)  # positions one sequence may hold
        self.n_batch = cp.n_batch
        self.n_threads = threads
        self.mem = ll.llama_get_memory(self.ctx)
        self._tok = _Batch(self.n_batch)
        self._tok.logits_all = self.logits_all = p.logits_all
        self._emb: _Batch | None = None  # allocated on the first embedding batch
        self.embd_capacity = p.embd_rows or self.n_batch
        self.n_vocab = model.n_vocab
        self.n_batches = 0  # llama_decode calls made by decode_tokens/decode_embd

    def close(self) -> None:
        for b in ("_tok", "_emb"):
            if getattr(self, b, None) is not None:
                getattr(self, b).free()
        release(self, "ctx", ll.llama_free)

    def __del__(self):
        self.close()

    def _decode(self, batch: _Batch) -> None:
        self.n_batches += 1
        rc = compute_thread.run(ll.llama_decode, self.ctx, batch.batch)
        if rc:
            self._raise(rc)

    def _raise(self, rc: int) -> None:
        if rc == 1:
            raise ContextOverflowError(f"llama_decode: no room in the KV cache (n_ctx={self.n_ctx})")
        raise LlamaError(f"llama_decode failed with code {rc}")

    def decode_tokens(self, tokens, pos0: int, *, logits_last: bool = True) -> None:
        """Decode `tokens` at positions pos0.. in n_batch chunks; logits only for the last one (for
        every position with ContextParams.logits_all)."""
        n_all = len(tokens)
        b = self._tok
        toks = np.asarray(tokens, dtype=np.int32)
        for s in range(0, n_all, self.n_batch):
            n = min(self.n_batch, n_all - s)
            b.token[:n] = toks[s : s + n]
            b.fill(n, pos0 + s, logits_last and s + n == n_all)
            self._decode(b)

    def decode_one(self, token: int, pos: int) -> None:
        """Decode a single token with logits (the generation fast path)."""
        b = self._tok
        b.set_one(token, pos)
        rc = compute_thread.run(ll.llama_decode, self.ctx, b.batch)
        if rc:
            self._raise(rc)

    def decode_embd(self, rows: np.ndarray, pos0: int, *, logits_last: bool = False) -> None:
        """Decode embedding rows [n, n_embd] at positions pos0.. (embd_capacity rows per batch)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise LlamaError(
                f"embedding rows of shape {tuple(rows.shape)} do not match the language "
                f"model's embedding width {self.model.n_embd}"
            )
        if self._emb is None:
            self._emb = _Batch(self.embd_capacity, self.model.n_embd)
            self._emb.logits_all = self.logits_all
        b = self._emb
        n_all = rows.shape[0]
        for s in range(0, n_all, b.capacity):
            n = min(b.capacity, n_all - s)
            b.embd[:n] = rows[s : s + n]
            b.fill(n, pos0 + s, logits_last and s + n == n_all)
            self._decode(b)

    def decode_mixed(
        self, pos: np.ndarray, seq: np.ndarray, logits: np.ndarray, *, tokens=None, rows: np.ndarray | None = None
    ) -> None:
        """One llama_decode of entries from several sequences: token ids or embedding rows [n, n_embd],
        each at its own position and sequence, with logits where `logits` is 1 (then read with
        `logits(i)`, i counting the entries asked for, or the batch index through llama.cpp)."""
        n = len(pos)
        if rows is not None:
            if self._emb is None:
                self._emb = _Batch(self.embd_capacity, self.model.n_embd)
            b = self._emb
            b.embd[:n] = rows
        else:
            b = self._tok
            b.token[:n] = tokens
        if n > b.capacity:
            raise LlamaError(f"a batch of {n} entries is more than its capacity {b.capacity}")
        b.place(np.asarray(pos, np.int32), np.asarray(seq, np.int32), np.asarray(logits, np.int8))
        try:
            self._decode(b)
        finally:
            b.reset_seqs()

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of batch entry `i` of the last decode (-1: the last entry that asked for them;
        a view: copy to keep)."""
        ptr = ll.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise LlamaError("no logits available (nothing decoded with logits)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def all_logits(self, n: int) -> np.ndarray:
        """[n, n_vocab] logits of the last decode call's n positions, in a context made with
        ContextParams.logits_all (a view)."""
        if not self.logits_all or n > self.n_batch:
            raise LlamaError(
                f"logits of {n} positions need ContextParams(logits_all=True) and one batch (n_batch {self.n_batch})"
            )
        ptr = ll.llama_get_logits(self.ctx)
        if not ptr:
            raise LlamaError("no logits available (nothing decoded with logits)")
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab)

    def truncate(self, pos: int, seq: int = 0) -> bool:
        """Drop sequence `seq` from position `pos` on; False if llama.cpp cannot (then the sequence
        is emptied)."""
        ok = bool(ll.llama_memory_seq_rm(self.mem, seq, pos, -1))
        if not ok:
            ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
        return ok

    def clear(self) -> None:
        ll.llama_memory_clear(self.mem, True)

    def seq_state(self) -> ctypes.Array | None:
        """A copy of what the KV cache holds (positions, K and V rows; no logits), as
        llama_state_seq_get_data writes it; `load_seq_state` puts it into another context of the same
        model and settings, of any size that holds it. None if llama.cpp cannot write it."""
        n = ll.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * n)() if n else None
        if buf is None or not ll.llama_state_seq_get_data(self.ctx, buf, n, 0):
            return None
        return buf

    def load_seq_state(self, state: ctypes.Array) -> bool:
        """Replace the KV cache's contents by a `seq_state()` copy; False if llama.cpp refuses it
        (no room, other KV types or model), and the cache is then empty."""
        ok = bool(ll.llama_state_seq_set_data(self.ctx, state, len(state), 0))
        if not ok:
            self.clear()
        return ok
