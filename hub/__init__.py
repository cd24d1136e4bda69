"""Where the model files come from: local paths, a folder, or the Hugging Face Hub (downloaded into
its standard cache, resumably). Used by the front ends that load a model (`minicpm-run`,
`minicpm-serve`) and by the converter for checkpoints; nothing here imports the engine."""

from .fetch import (HubError, RepoNotFoundError, fetch_checkpoint, fetch_gguf, hf_cache_dir, list_cached,
                    size_text)
from .files import RepoFilesError
from .source import DEFAULT_MODEL, ENV_VAR, ModelChoice, ModelSourceError, choose_model, looks_like_repo_id

__all__ = ["HubError", "RepoNotFoundError", "RepoFilesError", "ModelSourceError", "ModelChoice", "DEFAULT_MODEL",
           "ENV_VAR", "choose_model", "looks_like_repo_id", "fetch_gguf", "fetch_checkpoint", "list_cached",
           "hf_cache_dir", "size_text"]
