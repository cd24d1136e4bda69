"""Open the model a front end was asked for: choose the files (local paths, a folder, a Hub repo,
$MINICPMV_MODEL, the default repo), download them once into the Hugging Face cache if they come
from the Hub, and load them (MiniCPMV.load). Errors are one line (ModelOpenError, a ValueError)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minicpmv import hub
from minicpmv.runtime import MiniCPMV

from .options import ModelOptions


class ModelOpenError(ValueError):
    """The model options name nothing usable, a download failed, or the files do not load."""


@dataclass(frozen=True)
class ModelFiles:
    model: Path
    mmproj: Path
    origin: str  # where they came from, for messages ("--model-dir OUT", "Hub repo ...")


def choose_files(
    o: ModelOptions, *, say: Callable[[str], None] = lambda s: None, progress: bool = False, verbose: bool = False
) -> ModelFiles:
    """The two GGUF files the options name; a Hub repo is downloaded now (cached files are used
    without any network request). KeyboardInterrupt passes through (a download resumes later)."""
    for p in (o.model, o.mmproj):
        if p is not None and p.is_dir():
            raise ModelOpenError(f"{p} is a folder: use --model-dir")
    try:
        choice = hub.choose_model(o.model, o.mmproj, o.model_dir, o.hf)
    except ValueError as e:
        raise ModelOpenError(str(e)) from None
    if choice.hub is None:
        if o.mmproj_quant is not None or o.refresh:
            raise ModelOpenError(
                f"--{'mmproj-quant' if o.mmproj_quant is not None else 'refresh'} applies to a "
                f"Hub repo; the model comes from {choice.origin} here"
            )
        return ModelFiles(choice.path, choice.mmproj, choice.origin)
    if not verbose:  # huggingface_hub's own retry warnings would break the one-line error rule
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        lm, mm = hub.fetch_gguf(choice.hub, o.mmproj_quant, refresh=o.refresh, say=say, progress=progress)
    except ValueError as e:  # HubError, RepoFilesError
        raise ModelOpenError(str(e)) from None
    return ModelFiles(lm, mm, choice.origin)


def open_model(files: ModelFiles, o: ModelOptions) -> MiniCPMV:
    """MiniCPMV.load with the options' settings (ModelOpenError, one line, if it fails)."""
    try:
        return MiniCPMV.load(
            files.model,
            files.mmproj,
            n_ctx=o.ctx,
            n_threads=o.threads,
            n_gpu_layers=o.gpu_layers,
            vision_dtype=o.vision_dtype,
            verbose=o.llama_log,
            low_memory=o.low_memory,
            kv_type=o.kv_type,
            flash_attn=o.flash_attn,
        )
    except (ValueError, OSError, RuntimeError) as e:
        raise ModelOpenError(" ".join(str(e).split())) from None
