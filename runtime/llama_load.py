"""How a language model's weights come into memory: the project's load policy over
llama_model_load_from_file, used by every load (runtime, tests' oracles, bench), so the weight
buffer choice (weight_buffers.py) and the page dropping (weight_pages.py) are made in one place."""

from __future__ import annotations

import sys

import llama_cpp as ll

from . import weight_pages
from .llama_backend import LlamaError, backend_init, clear_log, load_error
from .model_file import ModelFile
from .weight_buffers import BufferPlan, WeightBuffers, weight_buffers

LOAD_MAPPED_DROPPED = "mapped, pages of the weights llama.cpp copies dropped as it loads"
LOAD_READ = "read into memory"
LOAD_MAPPED = "mapped (llama.cpp's default)"


def default_gpu_layers() -> int:
    """All layers on the GPU on macOS (Metal is always built there), CPU elsewhere."""
    return -1 if sys.platform == "darwin" else 0


def load_mode(n_gpu_layers: int, vocab_only: bool, read_file: bool | None) -> str:
    """How load_model brings a language model's weights in (see its `read_file`)."""
    cpu_only = n_gpu_layers == 0 and not vocab_only
    if read_file is None:  # the default: CPU loads read (or map and drop), GPU loads map
        if cpu_only and weight_pages.supported():
            return LOAD_MAPPED_DROPPED
        read_file = cpu_only
    return LOAD_READ if read_file else LOAD_MAPPED


def load_model(
    file: ModelFile,
    *,
    n_gpu_layers: int = 0,
    vocab_only: bool = False,
    read_file: bool | None = None,
    buffers: BufferPlan | None = None,
) -> tuple[int, WeightBuffers]:
    """llama_model_load_from_file of an open file with this project's settings.

    `read_file`: None (default) for this project's choice: CPU-only on Linux, the file mapped with
    the pages of the weights llama.cpp copies dropped as it loads (weight_pages.py: 4.7 GB resident
    for the 8B Q4_K_M model instead of 5.0 read or 8.3 mapped); CPU-only elsewhere, read; with a GPU
    (Metal) mapped, which lets the weights be used in place. True: read the file into memory; False:
    map it as llama.cpp's own tools do (the benchmark's llama.cpp side). `buffers` forces a weight
    buffer plan (default: weight_buffers.plan_for_this_machine()).
    Returns (llama_model_p, the buffer choice). The header is checked by our own reader first
    (GGUFFormatError, one line, for a malformed file: llama.cpp must never see one, some faults abort
    it); LlamaError if llama.cpp refuses it anyway.
    """
    file.info  # noqa: B018 (the check)
    backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    mp.vocab_only = vocab_only
    wb = weight_buffers(mp, file.open_path, plan=buffers)
    how = load_mode(n_gpu_layers, vocab_only, read_file)
    dropper = None
    if how == LOAD_MAPPED_DROPPED:
        mp.load_mode = ll.LLAMA_LOAD_MODE_MMAP
        dropper = weight_pages.PageDropper(file, weight_pages.copied_tensors(file.open_path, wb))
        mp.progress_callback = dropper.callback
    elif how == LOAD_READ:
        mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
    clear_log()  # what this load logs explains its failure
    model = ll.llama_model_load_from_file(str(file.open_path).encode(), mp)
    if not model:
        reason = load_error()
        raise LlamaError(
            f"{file.path}: llama.cpp cannot load this file as a language model"
            + (f": {reason}" if reason else " (run with --verbose for llama.cpp's log)")
        )
    return model, wb
