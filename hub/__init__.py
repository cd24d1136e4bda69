"""Where the model files come from: local paths, a folder, or the Hugging Face Hub (downloaded into
its standard cache, resumably). Used by the front ends that load a model (`minicpm-run`,
`minicpm-serve`, through session/model.py) and by the converter for checkpoints; nothing here
imports the engine.

source.py: which model was asked for; files.py: which files of a repo; cache.py: the local cache;
download.py: getting files into it; fetch.py: the two entry points."""

from minicpmv.gguf_info import size_text

from .cache import hf_cache_dir, list_cached
from .download import HubError, RepoNotFoundError
from .fetch import fetch_checkpoint, fetch_gguf
from .files import RepoFilesError
from .source import DEFAULT_MODEL, ENV_VAR, ModelChoice, ModelSourceError, choose_model, looks_like_repo_id

__all__ = [
    "HubError",
    "RepoNotFoundError",
    "RepoFilesError",
    "ModelSourceError",
    "ModelChoice",
    "DEFAULT_MODEL",
    "ENV_VAR",
    "choose_model",
    "looks_like_repo_id",
    "fetch_gguf",
    "fetch_checkpoint",
    "list_cached",
    "hf_cache_dir",
    "size_text",
]
