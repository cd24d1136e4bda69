"""The one ctypes layer over llama.cpp (the `llama_cpp` low-level bindings of llama-cpp-python).

What the MiniCPM-V runtime, the tests' oracles and the benchmark's llama.cpp side need: load a
language model, make a context, tokenize with special tokens parsed, turn tokens back into UTF-8
text incrementally, decode token batches and 64-row embedding batches at explicit positions, read
the last position's logits (or every position's), sample with a chain, and cut the KV cache back to
a prefix. llama.cpp's own multimodal pipeline (mtmd), for tests and benchmarks, builds on this in
runtime/mtmd.py.

Everything per-token is preallocated (one token batch, one embedding batch, one sampler chain per
generation), so the Python cost of a decode step is a handful of ctypes stores and two C calls.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

import llama_cpp as ll

from minicpmv.cpu import default_threads
from minicpmv.schema import REFERENCE_SAMPLING, TOKEN_EMBD

from . import weight_pages
from .buffers import BufferPlan, WeightBuffers, weight_buffers
from minicpmv.gguf_info import GGUFFormatError, read_gguf_info

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


class LlamaError(RuntimeError):
    """A llama.cpp call failed; the message is one line."""


class ContextOverflowError(LlamaError):
    """The prompt (plus the tokens to generate) does not fit in the context window."""


# --------------------------------------------------------------------------- logging and backend

_log_state = {"verbose": False, "init": False, "last": 0}
_LOG_DEBUG, _LOG_CONT = 1, 5   # enum ggml_log_level (ggml.h)
_log_tail: deque[str] = deque(maxlen=200)   # recent non-debug lines, for error messages


@ll.llama_log_callback
def log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # verbose=True: info, warnings and errors (debug lines come per decode call and slow
    # generation); verbose="debug": everything
    if level != _LOG_CONT:
        _log_state["last"] = level
    if not text or (_log_state["last"] == _LOG_DEBUG and _log_state["verbose"] != "debug"):
        return
    line = text.decode("utf-8", errors="replace")
    _log_tail.append(line)
    if _log_state["verbose"]:
        sys.stderr.write(line)
        sys.stderr.flush()


def recent_log(n: int = 20) -> str:
    """The last `n` lines llama.cpp (or mtmd) logged, debug lines left out: what a failed call said."""
    return "".join(list(_log_tail)[-n:])


def load_error() -> str | None:
    """What llama.cpp logged as the reason a model load failed ("tensor 'blk.0.attn_k.weight' not
    found"); None if it said nothing."""
    for line in reversed(_log_tail):
        _, sep, reason = line.partition("error loading model: ")
        if sep:
            return re.sub(r"^[a-z_]+: ", "", " ".join(reason.split())) or None   # drop the C function name
    return None


def init_backend(verbose: bool | str = False) -> None:
    """Route llama.cpp's log through us (silent unless verbose; "debug" for every line) and
    initialise the backend once.

    llama-cpp-python installs a callback at import that prints everything; this replaces it.
    """
    _log_state["verbose"] = verbose
    ll.llama_log_set(log_callback, ctypes.c_void_p(0))
    _backend_init()


def _backend_init() -> None:
    if not _log_state["init"]:
        ll.llama_backend_init()
        _log_state["init"] = True


def release(obj, attr: str, free) -> None:
    """Free the llama.cpp handle held in `obj.<attr>` once (close() and __del__ may both run, and
    __init__ may have failed before setting it)."""
    handle = getattr(obj, attr, None)
    if handle:
        free(handle)
        setattr(obj, attr, None)


def default_gpu_layers() -> int:
    """All layers on the GPU on macOS (Metal is always built there), CPU elsewhere."""
    return -1 if sys.platform == "darwin" else 0


# --------------------------------------------------------------------------- model and vocabulary

LOAD_MAPPED_DROPPED = "mapped, pages of the weights llama.cpp copies dropped as it loads"
LOAD_READ = "read into memory"
LOAD_MAPPED = "mapped (llama.cpp's default)"


def load_mode(n_gpu_layers: int, vocab_only: bool, read_file: bool | None) -> str:
    """How load_model brings a language model's weights in (see its `read_file`)."""
    cpu_only = n_gpu_layers == 0 and not vocab_only
    if read_file is None:   # the default: CPU loads read (or map and drop), GPU loads map
        if cpu_only and weight_pages.supported():
            return LOAD_MAPPED_DROPPED
        read_file = cpu_only
    return LOAD_READ if read_file else LOAD_MAPPED


def load_model(path: str | os.PathLike, *, n_gpu_layers: int = 0, vocab_only: bool = False,
               read_file: bool | None = None, buffers: BufferPlan | None = None) -> tuple[int, WeightBuffers]:
    """llama_model_load_from_file with this project's settings; every load goes through here
    (runtime, tests' oracles, bench), so the weight buffer choice (buffers.py) is made once.

    `read_file`: None (default) for this project's choice: CPU-only on Linux, the file mapped with
    the pages of the weights llama.cpp copies dropped as it loads (runtime/weight_pages.py: 4.7 GB
    resident for the 8B Q4_K_M model instead of 5.0 read or 8.3 mapped); CPU-only elsewhere, read;
    with a GPU (Metal) mapped, which lets the weights be used in place. True: read the file into
    memory; False: map it as llama.cpp's own tools do (the benchmark's llama.cpp side).
    `buffers` forces a weight buffer plan (default: buffers.plan_for_this_machine()).
    Returns (llama_model_p, the buffer choice). The file is checked by our own reader first
    (GGUFFormatError, one line, for a malformed file: llama.cpp must never see one, some faults abort
    it); LlamaError if llama.cpp refuses it anyway.
    """
    read_gguf_info(path)
    _backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    mp.vocab_only = vocab_only
    wb = weight_buffers(mp, path, plan=buffers)
    how = load_mode(n_gpu_layers, vocab_only, read_file)
    dropper = None
    if how == LOAD_MAPPED_DROPPED:
        mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP
        dropper = weight_pages.PageDropper(path, weight_pages.drop_ranges(path, weight_pages.copied_tensors(path, wb)))
        mp.progress_callback = dropper.callback
    elif how == LOAD_READ:
        mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
    _log_tail.clear()   # what this load logs explains its failure
    model = ll.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        reason = load_error()
        raise LlamaError(f"{path}: llama.cpp cannot load this file as a language model"
                         + (f": {reason}" if reason else " (run with --verbose for llama.cpp's log)"))
    return model, wb


@dataclass(frozen=True)
class KVShape:
    """What one KV cache position holds: in each of n_layer layers, n_head_kv heads of K and of V."""
    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int


class LlamaModel:
    """A loaded GGUF language model and its vocabulary."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int | None = None,
                 vocab_only: bool = False, verbose: bool | str = False, buffers: BufferPlan | None = None,
                 read_file: bool | None = None):
        init_backend(verbose)
        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaError(f"{self.path}: no such model file")
        n_gpu = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.model, self.buffers = load_model(self.path, n_gpu_layers=n_gpu, vocab_only=vocab_only,
                                              buffers=buffers, read_file=read_file)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        # n_embd_inp is the width of input embedding rows; 0 for vocab-only loads (docs/pitfalls.md §4)
        self.n_embd = ll.llama_model_n_embd_inp(self.model) or ll.llama_model_n_embd(self.model)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)

    def close(self) -> None:
        release(self, "model", ll.llama_model_free)

    def __del__(self):
        self.close()

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with (`<arch>.context_length`)."""
        return ll.llama_model_n_ctx_train(self.model)

    def kv_shape(self) -> KVShape:
        """The KV cache's shape per position (head sizes from `<arch>.attention.key_length` /
        `value_length`, which default to n_embd / n_head as in llama.cpp)."""
        arch = self.meta(gguf.Keys.General.ARCHITECTURE) or ""
        n_head = ll.llama_model_n_head(self.model)
        head = ll.llama_model_n_embd(self.model) // n_head if n_head else 0
        dim = lambda key: int(self.meta(key.format(arch=arch)) or head)  # noqa: E731
        return KVShape(ll.llama_model_n_layer(self.model), ll.llama_model_n_head_kv(self.model),
                       dim(gguf.Keys.Attention.KEY_LENGTH), dim(gguf.Keys.Attention.VALUE_LENGTH))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            raise LlamaError(f"llama_tokenize failed ({n})")
        return arr[:n]

    def token_id(self, text: str) -> int | None:
        """Id of `text` if it is exactly one token (special tokens parsed), else None."""
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def piece(self, token: int) -> bytes:
        """Raw bytes of one token (special tokens rendered as their text, like the reference's
        decode without skip_special_tokens). Cached: the decode loop calls this per token."""
        p = self._pieces.get(token)
        if p is None:
            buf = self._piece_buf
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            p = buf.raw[:n]
            self._pieces[token] = p
        return p

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))


# --------------------------------------------------------------------------- input embeddings

class TokenEmbeddings:
    """Rows of the language model's input embedding table (token_embd), dequantized with gguf-py.

    llama.cpp cannot mix token ids and embedding rows in one batch, so an image placeholder
    ("<image>" + 64 rows + "</image>" + "<slice>" + 64 rows + ...) would take one decode call per
    text run between slots; every call reads all the weights once, which dominates for small
    batches. Turning those tokens into their embedding rows lets the whole placeholder, and the
    text right after it, go through one embedding batch. The rows are exactly what llama.cpp's
    get_rows feeds the first layer (Qwen3 does not scale input embeddings).
    """

    NAME = TOKEN_EMBD
    MAX_CACHED = 1024   # rows (16 MB at the 8B model's width 4096)

    def __init__(self, path: str | os.PathLike, n_embd: int):
        self.path, self.n_embd = Path(path), n_embd
        self._rows: dict[int, np.ndarray] = {}
        self._info = None
        self._ok: bool | None = None

    @property
    def available(self) -> bool:
        """False when the table cannot be read here (then callers decode token batches)."""
        if self._ok is None:
            self._ok = False
            try:
                info = read_gguf_info(self.path)
                t = info.tensors[self.NAME]
                if t.shape[0] == self.n_embd:
                    info.rows(self.NAME, [0])  # is the type supported by gguf-py's dequantizer?
                    self._info, self._ok = info, True
            except (OSError, GGUFFormatError, KeyError, NotImplementedError):
                pass  # unreadable file, no token_embd, or a type gguf-py cannot dequantize: token batches
        return self._ok

    def rows(self, ids: list[int]) -> np.ndarray:
        """[len(ids), n_embd] float32 (cached per id: placeholders repeat a few tokens; the cache is
        emptied when it would pass MAX_CACHED rows, so long fused questions do not pile up)."""
        missing = sorted({i for i in ids if i not in self._rows})
        if missing:
            if not self.available:
                raise LlamaError(f"{self.path}: token embeddings cannot be read")
            if len(self._rows) + len(missing) > self.MAX_CACHED:
                self._rows.clear()
                missing = sorted(set(ids))
            for i, row in zip(missing, self._info.rows(self.NAME, missing)):
                self._rows[i] = row
        return np.stack([self._rows[i] for i in ids]) if ids else np.zeros((0, self.n_embd), np.float32)


# --------------------------------------------------------------------------- batches

class _Batch:
    """A preallocated llama_batch for one sequence (tokens, or embedding rows of width n_embd)."""

    def __init__(self, capacity: int, n_embd: int = 0):
        self.capacity = capacity
        self.n_embd = n_embd
        self.batch = ll.llama_batch_init(capacity, n_embd, 1)
        b = self.batch
        for i in range(capacity):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)),
                                            shape=(capacity,))
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

    def free(self) -> None:
        if self.batch is not None:   # a struct passed by value: truthy whatever it holds
            ll.llama_batch_free(self.batch)
            self.batch = None


# --------------------------------------------------------------------------- context

@dataclass
class ContextParams:
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None
    embd_rows: int | None = None  # rows per embedding batch (default n_batch)
    kv_type: str = "f16"         # KV cache precision: "f16" (llama.cpp's default), "f32" or "q8_0"
    flash_attn: bool | None = None   # None: llama.cpp decides (on for CPU); its CPU kernel is f16
    # llama.cpp's eval callback (cb_eval): called with (address of a ggml_tensor of the graph, ask)
    # as the graph is computed, see ggml_backend_sched_eval_callback; e.g. quant.imatrix_collect
    cb_eval: Callable[[int, bool], bool] | None = None
    # every decoded position computes its logits; otherwise llama.cpp's last layer keeps only the
    # positions that output (what an eval callback sees of that layer changes with it)
    logits_all: bool = False


# ggml_type ids. q8_0 halves the cache (llama.cpp quantizes K and V per 32 values; a quantized V
# cache needs flash attention, which is llama.cpp's CPU default).
_KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}
KV_TYPES = tuple(_KV_TYPES)


class LlamaContext:
    """One inference context with one sequence (id 0); positions are managed by the caller."""

    def __init__(self, model: LlamaModel, params: ContextParams | None = None):
        self.model = model
        p = params or ContextParams()
        threads = p.n_threads or default_threads()
        cp = ll.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = min(p.n_batch, p.n_ctx)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = 1
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
        cp.n_outputs_max = 0 if p.logits_all else 1
        self._cb_eval = None
        if p.cb_eval is not None:
            fn = p.cb_eval
            # kept on self: llama.cpp holds the C pointer for the context's lifetime
            self._cb_eval = ll.ggml_backend_sched_eval_callback(lambda t, ask, _ud: bool(fn(t or 0, bool(ask))))
            cp.cb_eval = self._cb_eval
            cp.cb_eval_user_data = None
        self.ctx = ll.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise LlamaError(f"cannot create a llama.cpp context with n_ctx={p.n_ctx} "
                             "(out of memory?)")
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.n_batch = cp.n_batch
        self.n_threads = threads
        self.mem = ll.llama_get_memory(self.ctx)
        self._tok = _Batch(self.n_batch)
        self._tok.logits_all = self.logits_all = p.logits_all
        self._emb: _Batch | None = None     # allocated on the first embedding batch
        self.embd_capacity = p.embd_rows or self.n_batch
        self.n_vocab = model.n_vocab
        self.n_batches = 0   # llama_decode calls made by decode_tokens/decode_embd

    def close(self) -> None:
        for b in ("_tok", "_emb"):
            if getattr(self, b, None) is not None:
                getattr(self, b).free()
        release(self, "ctx", ll.llama_free)

    def __del__(self):
        self.close()

    def _decode(self, batch: _Batch) -> None:
        self.n_batches += 1
        rc = ll.llama_decode(self.ctx, batch.batch)
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
            b.token[:n] = toks[s:s + n]
            b.fill(n, pos0 + s, logits_last and s + n == n_all)
            self._decode(b)

    def decode_one(self, token: int, pos: int) -> None:
        """Decode a single token with logits (the generation fast path)."""
        b = self._tok
        b.set_one(token, pos)
        rc = ll.llama_decode(self.ctx, b.batch)
        if rc:
            self._raise(rc)

    def decode_embd(self, rows: np.ndarray, pos0: int, *, logits_last: bool = False) -> None:
        """Decode embedding rows [n, n_embd] at positions pos0.. (embd_capacity rows per batch)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise LlamaError(f"embedding rows of shape {tuple(rows.shape)} do not match the language "
                             f"model's embedding width {self.model.n_embd}")
        if self._emb is None:
            self._emb = _Batch(self.embd_capacity, self.model.n_embd)
            self._emb.logits_all = self.logits_all
        b = self._emb
        n_all = rows.shape[0]
        for s in range(0, n_all, b.capacity):
            n = min(b.capacity, n_all - s)
            b.embd[:n] = rows[s:s + n]
            b.fill(n, pos0 + s, logits_last and s + n == n_all)
            self._decode(b)

    def logits(self) -> np.ndarray:
        """Logits of the last decoded position that requested them (a view: copy to keep)."""
        ptr = ll.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise LlamaError("no logits available (nothing decoded with logits)")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def all_logits(self, n: int) -> np.ndarray:
        """[n, n_vocab] logits of the last decode call's n positions, in a context made with
        ContextParams.logits_all (a view)."""
        if not self.logits_all or n > self.n_batch:
            raise LlamaError(f"logits of {n} positions need ContextParams(logits_all=True) and one batch "
                             f"(n_batch {self.n_batch})")
        ptr = ll.llama_get_logits(self.ctx)
        if not ptr:
            raise LlamaError("no logits available (nothing decoded with logits)")
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab)

    def truncate(self, pos: int) -> bool:
        """Drop the KV cache from position `pos` on; False if llama.cpp cannot (then it is cleared)."""
        ok = bool(ll.llama_memory_seq_rm(self.mem, 0, pos, -1))
        if not ok:
            ll.llama_memory_clear(self.mem, True)
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


# --------------------------------------------------------------------------- sampling

@dataclass
class SamplingParams:
    temperature: float = REFERENCE_SAMPLING.temperature
    top_p: float = REFERENCE_SAMPLING.top_p
    top_k: int = REFERENCE_SAMPLING.top_k
    repetition_penalty: float = REFERENCE_SAMPLING.repetition_penalty
    seed: int | None = None
    greedy: bool = False


class Sampler:
    """Sampling in the reference's (transformers') order:
    repetition penalty -> top-k -> temperature -> top-p -> random pick.

    transformers applies temperature before top-k and top-p; top-k does not depend on the
    temperature, top-p does, so the temperature goes between them. `greedy` keeps the penalty and
    takes the argmax.

    The repetition penalty is applied here, in place on llama.cpp's logits row, to the tokens
    generated so far (transformers penalises the generated ids when generating from input
    embeddings: divide positive logits, multiply negative ones). llama.cpp's penalties sampler
    does the same but visits every vocabulary entry (151k) per token; this visits only the
    distinct generated ids. The rest is one llama.cpp sampler chain.
    """

    def __init__(self, n_vocab: int, params: SamplingParams):
        self.chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda s: ll.llama_sampler_chain_add(self.chain, s)  # noqa: E731 (chain owns s)
        p = params
        self.n_vocab = n_vocab
        self.penalty = float(p.repetition_penalty)
        if self.penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.penalty}")
        self._track = self.penalty != 1.0   # the generated ids matter only for the penalty
        self._seen: set[int] = set()
        self._seen_ids = np.zeros(64, dtype=np.int64)
        if p.greedy or p.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
        else:
            if p.top_k and p.top_k > 0:
                add(ll.llama_sampler_init_top_k(p.top_k))
            add(ll.llama_sampler_init_temp(p.temperature))
            if p.top_p < 1.0:
                add(ll.llama_sampler_init_top_p(p.top_p, 1))
            add(ll.llama_sampler_init_dist(LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF))

    def sample(self, ctx: LlamaContext) -> int:
        """Sample the next token from the last logits (and remember it for the penalty)."""
        n = len(self._seen)
        if n:
            row = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx.ctx, -1), shape=(self.n_vocab,))
            ids = self._seen_ids[:n]
            v = row[ids]
            row[ids] = np.where(v < 0, v * self.penalty, v / self.penalty)
        tok = ll.llama_sampler_sample(self.chain, ctx.ctx, -1)
        if self._track and tok not in self._seen:
            if n == len(self._seen_ids):
                self._seen_ids = np.concatenate([self._seen_ids, np.zeros_like(self._seen_ids)])
            self._seen_ids[n] = tok
            self._seen.add(tok)
        return tok

    def close(self) -> None:
        release(self, "chain", ll.llama_sampler_free)

    def __del__(self):
        self.close()
