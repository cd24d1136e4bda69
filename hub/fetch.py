"""Fetch GGUF files or a checkpoint from the Hugging Face Hub into its standard cache, resumably.

huggingface_hub does the Hub side: HF_ENDPOINT, HF_TOKEN / `hf auth login`, HF_HUB_OFFLINE, HF_HOME,
file listing, metadata, the cache layout (blobs/, snapshots/, refs/). What is added here:
- cache first: when the files asked for are in the snapshot of `main`, no request is made at all, so
  later runs start without network (and refresh=True asks the Hub again);
- only the needed files, announced in one line with their sizes, refused when the disk is too full;
- a download cut off (network, Ctrl-C) keeps `blobs/<etag>.incomplete`, the name huggingface_hub's
  cache scanner knows, and the next run continues it with a Range request; huggingface_hub 2.x deletes
  its own partial files, so the bytes are fetched here (its http_get, plain HTTP, no hf_xet) and the
  finished blob handed to hf_hub_download, which links it into the snapshot;
- LFS files are checked against the sha256 the Hub lists before they enter the cache;
- one-line errors (HubError) for every failure.
"""

from __future__ import annotations

from pathlib import Path

from .cache import cached_snapshot, files_in, offline
from .download import HubError, Say, download, hub_errors, list_repo, offline_message
from .files import GGUFPair, RepoFilesError, checkpoint_files, select_gguf
from .source import HubRef, parse_hub_ref


def _ordered(lm: Path, mmproj: Path) -> tuple[Path, Path]:
    """Tell the two GGUFs apart by general.architecture (the mmproj's is 'clip'), not by their names
    (ModelFileError, a ValueError, if they are not one language model and one mmproj)."""
    from minicpmv.gguf_info import find_model_files

    return find_model_files(lm, mmproj)


# ----------------------------------------------------------------------------------------------- entry points


def _quiet(msg: str) -> None:
    pass


def fetch_gguf(
    ref: HubRef | str,
    mmproj_quant: str | None = None,
    *,
    refresh: bool = False,
    say: Say = _quiet,
    progress: bool = True,
) -> tuple[Path, Path]:
    """(language model, mmproj) GGUF paths for `ref` ("owner/name[:QUANT]"), from the cache or
    downloaded into it: `MiniCPMV.load(*fetch_gguf("openbmb/MiniCPM-V-4_5-gguf:Q4_K_M"))`.

    Cached files are used without any request unless `refresh`; otherwise one listing request, then
    per file a metadata request and, if not cached, the download. Raises HubError or RepoFilesError.
    """
    if isinstance(ref, str):
        ref = parse_hub_ref(ref, "repo")
    what = f"{ref.repo} ({ref.quant})"
    cmd = f'minicpm-run --hf {ref.repo}:{ref.quant} IMAGE "QUESTION"'
    cached_note = ""
    snap = cached_snapshot(ref.repo, ref.revision)
    if snap is not None and (not refresh or offline()):
        try:
            pair = select_gguf(files_in(snap), ref.repo, ref.quant, ref.quant_given, mmproj_quant)
            return _ordered(snap / pair.lm[0], snap / pair.mmproj)
        except RepoFilesError as e:
            cached_note = f" ({e})"
    if offline():
        raise HubError(offline_message(what + cached_note, cmd))
    with hub_errors(ref.repo, what, cmd):
        files = list_repo(ref.repo, ref.revision)
        pair: GGUFPair = select_gguf(files, ref.repo, ref.quant, ref.quant_given, mmproj_quant)
        snap = download(ref.repo, ref.revision, [files[n] for n in pair.files], say, progress)
    return _ordered(snap / pair.lm[0], snap / pair.mmproj)


def _checkpoint_complete(snap: Path) -> bool:
    """config.json, the tokenizer config and every shard the index names (or the single file)."""
    import json

    if not ((snap / "config.json").is_file() and (snap / "tokenizer_config.json").is_file()):
        return False
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return False
        return all((snap / s).is_file() for s in shards)
    return (snap / "model.safetensors").is_file()


def fetch_checkpoint(
    repo: str, revision: str = "main", *, refresh: bool = False, say: Say = _quiet, progress: bool = True
) -> Path:
    """Snapshot folder of a Hugging Face checkpoint holding the files conversion reads
    (safetensors, index, configs, tokenizer files), from the cache or downloaded into it."""
    cmd = f"minicpm-convert {repo} -o OUT"
    snap = cached_snapshot(repo, revision)
    if snap is not None and (not refresh or offline()) and _checkpoint_complete(snap):
        return snap
    if offline():
        raise HubError(offline_message(f"the checkpoint {repo}", cmd))
    with hub_errors(repo, f"the checkpoint {repo}", cmd):
        files = list_repo(repo, revision)
        names = checkpoint_files(files, repo)
        return download(repo, revision, [files[n] for n in names], say, progress)
