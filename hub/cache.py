"""The Hugging Face cache as this project reads it: where it is, what snapshot a revision points
to, and which MiniCPM-V models it holds. No network."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minicpmv.gguf_info import size_text

from .files import is_mmproj, quant_label

_COMMIT = re.compile(r"[0-9a-f]{40}")


def hf_cache_dir() -> Path:
    """The Hub cache in use (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def repo_dir(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hf_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# ----------------------------------------------------------------------------------------------- cache


def cached_snapshot(repo: str, revision: str = "main") -> Path | None:
    """snapshots/<commit> that `revision` points to in the local cache, if any (no network)."""
    d = repo_dir(repo)
    ref = d / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else (revision if _COMMIT.fullmatch(revision) else None)
    snap = d / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() else None


def files_in(snap: Path) -> list[str]:
    # is_file() follows the links into blobs/: a link whose blob was deleted does not count.
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class CachedModel:
    repo: str
    summary: str  # e.g. "Q4_K_M 5.03 GB, Q8_0 8.71 GB; mmproj F16 1.10 GB"
    use: str  # the command that runs (or converts) it
    path: Path  # the repo's folder in the cache


def list_cached() -> tuple[list[CachedModel], list[tuple[str, int]]]:
    """MiniCPM-V models in the cache (GGUF repos with an mmproj; checkpoints of model_type minicpmv)
    and unfinished downloads (repo, bytes so far). Reads the disk only."""
    import json

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return [], []
    models = []
    for r in sorted(info.repos, key=lambda r: r.repo_id):
        if r.repo_type != "model":
            continue
        files: dict[str, tuple[int, Path]] = {}
        for rev in r.revisions:
            for cf in rev.files:
                files[cf.file_path.relative_to(rev.snapshot_path).as_posix()] = (cf.size_on_disk, cf.file_path)
        ggufs = {n: s for n, (s, _) in files.items() if n.lower().endswith(".gguf")}
        lms = {n: s for n, s in ggufs.items() if not is_mmproj(n)}
        mms = {n: s for n, s in ggufs.items() if is_mmproj(n)}
        if lms and mms:

            def part(d: dict[str, int]) -> str:
                return ", ".join(f"{quant_label(n) or n} {size_text(s)}" for n, s in sorted(d.items()))

            first = quant_label(min(lms)) or ""
            models.append(
                CachedModel(
                    r.repo_id,
                    f"{part(lms)}; mmproj {part(mms)}",
                    f"minicpm-run --hf {r.repo_id}{':' + first if first else ''}",
                    r.repo_path,
                )
            )
            continue
        cfg = files.get("config.json")
        shards = {n: s for n, (s, _) in files.items() if n.endswith(".safetensors")}
        if cfg and shards:
            try:
                model_type = json.loads(cfg[1].read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            if model_type == "minicpmv":
                models.append(
                    CachedModel(
                        r.repo_id,
                        f"checkpoint, {len(shards)} safetensors files, {size_text(sum(shards.values()))}",
                        f"minicpm-convert {r.repo_id} -o OUT",
                        r.repo_path,
                    )
                )
    partial: dict[str, int] = {}
    for inc in info.incomplete_files:
        folder = inc.file_path.parent.parent.name  # models--owner--name
        kind, _, rest = folder.partition("--")
        if kind == "models":
            repo = rest.replace("--", "/", 1)
            partial[repo] = partial.get(repo, 0) + inc.size_on_disk
    return models, sorted(partial.items())
