"""Which files of a Hub repo to fetch, chosen by name before anything is downloaded.

GGUF repos (OpenBMB's `ggml-model-Q4_K_M.gguf` + `mmproj-model-f16.gguf`, or ours:
`MiniCPM-V-4.5-Q4_K_M.gguf` + `mmproj-MiniCPM-V-4.5-F16.gguf`): one language model of the asked quant
(matched case-insensitively as a whole word of the file name, so Q4_K does not pick Q4_K_M and F16 does
not pick BF16) and one mmproj (a file with "mmproj" in its name). Once downloaded, the two are told
apart by their metadata (hub.py), as for a local folder. Checkpoint repos: only what conversion reads.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable

import gguf

DEFAULT_MMPROJ_QUANT = "f16"

# Quant names as they appear in GGUF file names: llama.cpp's file types and tensor types.
QUANT_LABELS = frozenset(
    {n.split("_", 1)[1] for n in gguf.LlamaFileType.__members__ if n.startswith(("ALL_", "MOSTLY_"))}
    | {t.name for t in gguf.GGMLQuantizationType}
)

# llama.cpp's split files: NAME-00001-of-00003.gguf (llama.cpp loads the rest from the first part).
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})(?=\.gguf$)", re.IGNORECASE)

# What conversion reads (convert/checkpoint.py, config.py, tokenizer.py), at the repo root only:
# no *.bin/*.pt duplicates of the weights, no images, no remote code.
CHECKPOINT_PATTERNS = ("*.safetensors", "*.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")


class RepoFilesError(ValueError):
    """The repo lacks the asked files, or several match (one line, listing what it has)."""


def _word(token: str) -> re.Pattern:
    # '_' continues a quant name on the right (Q4_K_M after Q4_K) but may separate it on the left.
    return re.compile(rf"(?<![a-z0-9]){re.escape(token.lower())}(?![a-z0-9_])")


def has_quant(name: str, quant: str) -> bool:
    return _word(quant).search(basename(name).lower()) is not None


def basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def quant_label(name: str) -> str | None:
    """The longest known quant name in a file name (Q4_K_M, F16, ...), upper-case, or None."""
    found = [q for q in QUANT_LABELS if has_quant(name, q)]
    return max(found, key=len).upper() if found else None


def is_mmproj(name: str) -> bool:
    return "mmproj" in basename(name).lower()


def _label(name: str) -> str:
    return quant_label(name) or basename(name)


@dataclass(frozen=True)
class GGUFPair:
    lm: tuple[str, ...]  # repo paths; several parts when llama.cpp split the file (first part first)
    mmproj: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.lm, self.mmproj)


def _lm_groups(names: list[str]) -> dict[str, list[str]]:
    """Language-model files grouped by name without the split suffix; parts sorted."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(_SPLIT.sub("", n), []).append(n)
    return groups


def select_gguf(
    names: Iterable[str], where: str, quant: str, quant_given: bool = True, mmproj_quant: str | None = None
) -> GGUFPair:
    """Pick the language model of `quant` and the mmproj (`mmproj_quant`, default the only one or f16)
    among `names` (paths in the repo). `quant_given=False`: a repo with a single language model
    serves it whatever its quant. Raises RepoFilesError naming what `where` has."""
    names = list(names)
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if not ggufs:
        hint = (
            f"; it holds a checkpoint: convert it with `minicpm-convert {where} -o OUT`"
            if any(n.endswith(".safetensors") for n in names)
            else ""
        )
        raise RepoFilesError(f"{where} has no .gguf files{hint}")
    mms = [n for n in ggufs if is_mmproj(n)]
    groups = _lm_groups([n for n in ggufs if not is_mmproj(n)])
    if not groups:
        raise RepoFilesError(f"{where} has no language-model GGUF, only mmproj files ({', '.join(mms)})")
    if not mms:
        raise RepoFilesError(
            f"{where} has no mmproj GGUF (vision projector, 'mmproj' in its name) next to "
            f"its language models ({', '.join(groups)})"
        )

    lm_hits = [g for g in groups if has_quant(g, quant)]
    if not lm_hits and not quant_given and len(groups) == 1:
        lm_hits = list(groups)
    if len(lm_hits) != 1:
        have = ", ".join(sorted({_label(g) for g in groups}))
        if not lm_hits:
            raise RepoFilesError(f"{where} has no language-model GGUF of quant {quant}; available: {have}")
        raise RepoFilesError(
            f"{where}: several language-model GGUFs match {quant} "
            f"({', '.join(lm_hits)}); give a more precise quant name"
        )

    if mmproj_quant is None and len(mms) == 1:
        mm_hits = mms
    else:
        mm_hits = [n for n in mms if has_quant(n, mmproj_quant or DEFAULT_MMPROJ_QUANT)]
    if len(mm_hits) != 1:
        have = ", ".join(sorted({_label(n) for n in mms}))
        if mmproj_quant is None:
            raise RepoFilesError(f"{where} has several mmproj files ({have}); choose one with --mmproj-quant")
        if not mm_hits:
            raise RepoFilesError(f"{where} has no mmproj of type {mmproj_quant}; available: {have}")
        raise RepoFilesError(f"{where}: several mmproj files match {mmproj_quant} ({', '.join(mm_hits)})")
    return GGUFPair(tuple(groups[lm_hits[0]]), mm_hits[0])


def checkpoint_files(names: Iterable[str], where: str) -> list[str]:
    """The files of a Hugging Face checkpoint that conversion reads (root level)."""
    names = list(names)
    keep = sorted(n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in CHECKPOINT_PATTERNS))
    if not any(n.endswith(".safetensors") for n in keep):
        hint = (
            f'; it holds GGUF files: run them with `minicpm-run --hf {where} IMAGE "QUESTION"`'
            if any(n.lower().endswith(".gguf") for n in names)
            else ""
        )
        raise RepoFilesError(f"{where} has no .safetensors weights to convert{hint}")
    if "config.json" not in keep:
        raise RepoFilesError(f"{where} has no config.json at its root: not a Hugging Face checkpoint")
    return keep
