"""Which model the user asked for: local GGUF files, a folder, or a Hugging Face Hub repo.

Precedence: `--model/--mmproj` or `--model-dir` > `--hf REPO[:QUANT]` > the environment variable
MINICPMV_MODEL (a folder or REPO[:QUANT]) > DEFAULT_MODEL. Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_MODEL = "openbmb/MiniCPM-V-4_5-gguf:Q4_K_M"
DEFAULT_QUANT = "Q4_K_M"
ENV_VAR = "MINICPMV_MODEL"

# The Hub's repo-id rule: "owner/name", each part letters, digits, '-', '_', '.', not starting
# or ending with '-' or '.', no '--' or '..'. A local path like ./x, ../x, /x or a/b/c never matches.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?!.*(--|\.\.))({_PART})/({_PART})")


class ModelSourceError(ValueError):
    """The model options contradict each other or name nothing usable (one line)."""


def looks_like_repo_id(s: str) -> bool:
    return _REPO_ID.fullmatch(s) is not None


@dataclass(frozen=True)
class HubRef:
    """A Hub repo and the language-model quant wanted from it."""

    repo: str
    quant: str = DEFAULT_QUANT
    quant_given: bool = False  # False: DEFAULT_QUANT, or the repo's only language model
    revision: str = "main"

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant_given else self.repo


def parse_hub_ref(spec: str, what: str = "--hf") -> HubRef:
    """ "owner/name" or "owner/name:QUANT" (repo ids never contain ':')."""
    repo, sep, quant = spec.strip().partition(":")
    if not looks_like_repo_id(repo) or (sep and not re.fullmatch(r"[A-Za-z0-9_.-]+", quant)):
        raise ModelSourceError(
            f"{what} {spec!r}: expected a Hugging Face repo id OWNER/NAME[:QUANT], e.g. {DEFAULT_MODEL}"
        )
    return HubRef(repo, quant if sep else DEFAULT_QUANT, bool(sep))


@dataclass(frozen=True)
class ModelChoice:
    """Local files (`path` = LM GGUF with `mmproj`, or a folder holding both) or a Hub repo."""

    origin: str  # the option or variable that decided: for messages
    path: Path | None = None
    mmproj: Path | None = None
    hub: HubRef | None = None


def choose_model(
    model: Path | None = None,
    mmproj: Path | None = None,
    model_dir: Path | None = None,
    hf: str | None = None,
    env: Mapping[str, str] = os.environ,
) -> ModelChoice:
    """Apply the precedence above; conflicting explicit options are an error, not a silent choice."""
    if model_dir is not None and (model is not None or mmproj is not None):
        raise ModelSourceError("use either --model-dir or --model/--mmproj, not both")
    local = model_dir is not None or model is not None
    if local and hf is not None:
        raise ModelSourceError("use either --hf or local files (--model-dir, --model/--mmproj), not both")
    if model is not None and mmproj is None:
        raise ModelSourceError("--mmproj is required with --model (or use --model-dir)")
    if mmproj is not None and model is None:
        raise ModelSourceError("--mmproj needs --model (the language-model GGUF) too")
    if model_dir is not None:
        return ModelChoice("--model-dir", path=model_dir)
    if model is not None:
        return ModelChoice("--model", path=model, mmproj=mmproj)
    if hf is not None:
        return ModelChoice("--hf", hub=parse_hub_ref(hf))
    value = env.get(ENV_VAR, "").strip()
    if value:
        p = Path(value).expanduser()
        if p.is_dir():
            return ModelChoice(ENV_VAR, path=p)
        if looks_like_repo_id(value.partition(":")[0]):
            return ModelChoice(ENV_VAR, hub=parse_hub_ref(value, ENV_VAR))
        raise ModelSourceError(f"{ENV_VAR}={value}: neither a folder nor a Hugging Face repo id OWNER/NAME[:QUANT]")
    return ModelChoice("default", hub=parse_hub_ref(DEFAULT_MODEL))
