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

import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from minicpmv.gguf_info import size_text

from .files import GGUFPair, RepoFilesError, checkpoint_files, is_mmproj, quant_label, select_gguf
from .source import HubRef, parse_hub_ref

Say = Callable[[str], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(ValueError):
    """A Hub download or cache lookup failed; the message is one line saying what to do."""


class RepoNotFoundError(HubError):
    """The Hub has no such repo (or it is private and no valid token was sent)."""


def hf_cache_dir() -> Path:
    """The Hub cache in use (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE).expanduser()


def _repo_dir(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name
    return hf_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def _offline() -> bool:
    from huggingface_hub import constants
    return constants.is_offline_mode()


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


# ----------------------------------------------------------------------------------------------- cache

def cached_snapshot(repo: str, revision: str = "main") -> Path | None:
    """snapshots/<commit> that `revision` points to in the local cache, if any (no network)."""
    d = _repo_dir(repo)
    ref = d / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else (revision if _COMMIT.fullmatch(revision) else None)
    snap = d / "snapshots" / commit if commit else None
    return snap if snap is not None and snap.is_dir() else None


def _files_in(snap: Path) -> list[str]:
    # is_file() follows the links into blobs/: a link whose blob was deleted does not count.
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())


def _ordered(lm: Path, mmproj: Path) -> tuple[Path, Path]:
    """Tell the two GGUFs apart by general.architecture (the mmproj's is 'clip'), not by their names
    (ModelFileError, a ValueError, if they are not one language model and one mmproj)."""
    from minicpmv.gguf_info import find_model_files
    return find_model_files(lm, mmproj)


# ----------------------------------------------------------------------------------------------- errors

def _reason(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextmanager
def _hub_errors(repo: str, what: str, download_cmd: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line HubErrors."""
    import httpx2
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{repo} is gated: accept its conditions on {_endpoint()}/{repo}, then {login}") from None
    except RepositoryNotFoundError:
        raise RepoNotFoundError(f"{repo}: repository not found on the Hub ({_endpoint()}); "
                       f"check the name, or if it is private {login}") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: revision not found on the Hub") from None
    except RemoteEntryNotFoundError as e:
        raise HubError(f"{repo}: a file is missing on the Hub ({_reason(e)}); the repo changed, run again") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code == 401:
            raise HubError(f"{repo}: the Hub refused the credentials (HTTP 401); {login} again") from None
        if code == 403:
            raise HubError(f"{repo}: access denied (HTTP 403); {login} with an account that may read it") from None
        raise HubError(f"{repo}: the Hub answered HTTP {code} ({_reason(e)}); try again later") from None
    except OfflineModeIsEnabled:
        raise HubError(_offline_message(what, download_cmd)) from None
    except httpx2.TransportError as e:
        raise HubError(f"cannot reach the Hub at {_endpoint()} ({_reason(e)}) and {what} is not in the cache "
                       f"{hf_cache_dir()}; connect to the network and run the command again") from None
    except OSError as e:  # e.g. HF_ENDPOINT answering without the Hub's headers, or the cache not writable
        raise HubError(f"{what}: {_reason(e)}") from None


def _offline_message(what: str, download_cmd: str) -> str:
    return (f"offline (HF_HUB_OFFLINE is set) and {what} is not in the cache {hf_cache_dir()}; "
            f"run `{download_cmd}` once with network access to download it")


# ----------------------------------------------------------------------------------------------- downloads

@dataclass(frozen=True)
class RemoteFile:
    name: str                 # path in the repo
    size: int | None
    sha256: str | None        # LFS files: the content hash the Hub lists
    blob_id: str | None       # git object id (the ETag of a non-LFS file)

    @property
    def blob(self) -> str | None:
        """Its expected name in blobs/ (the Hub's ETag: sha256 for LFS files, else the git id)."""
        return self.sha256 or self.blob_id


def _listing(repo: str, revision: str) -> dict[str, RemoteFile]:
    """All files of the repo at `revision` with sizes and hashes: one API request."""
    from huggingface_hub import HfApi
    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    out = {}
    for s in info.siblings or []:
        lfs = s.lfs
        out[s.rfilename] = RemoteFile(s.rfilename, lfs.size if lfs else s.size, lfs.sha256 if lfs else None,
                                      s.blob_id)
    return out


def _check_disk(repo: str, need: int) -> None:
    where = hf_cache_dir()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need + need // 100 > free:  # keep 1% spare: a disk filled to the last byte hurts everything else
        raise HubError(f"not enough free disk space for {repo}: {size_text(need)} to download, "
                       f"{size_text(free)} free in {where}; free some space or point HF_HOME at a larger disk")


class _NoBar:
    """tqdm stand-in for progress=False (huggingface_hub calls it like tqdm)."""

    def __init__(self, *a, **k) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def _sha256(path: Path, name: str, progress: bool) -> str:
    from tqdm import tqdm
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                     desc=f"checking {name}", disable=not progress) as bar:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.netloc) == (pb.scheme, pb.netloc)


def _fill_blob(repo: str, f: RemoteFile, url: str, meta, progress: bool) -> None:
    """Download the bytes of `f` to blobs/<etag>, continuing blobs/<etag>.incomplete if a run left one."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    rdir = _repo_dir(repo)
    blob = rdir / "blobs" / meta.etag
    part = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = hf_cache_dir() / ".locks" / rdir.name / f"{meta.etag}.lock"  # huggingface_hub's lock for this blob
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if not _same_origin(url, meta.location):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
    size = meta.size if meta.size is not None else f.size
    with WeakFileLock(lock):
        if blob.is_file():
            return  # another process finished it meanwhile
        have = part.stat().st_size if part.is_file() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        try:
            with open(part, "ab") as out:
                http_get(meta.location, out, resume_size=have, headers=headers, expected_size=size,
                         displayed_filename=Path(f.name).name, tqdm_class=None if progress else _NoBar)
        except HfHubHTTPError:
            raise
        except (httpx2.TransportError, OSError) as e:
            got = part.stat().st_size if part.is_file() else 0
            if got == 0:
                part.unlink(missing_ok=True)
            raise HubError(f"download of {f.name} interrupted at {size_text(got)} of {size_text(size)} "
                           f"({_reason(e)}); run the same command again to resume") from None
        sha = meta.etag if _SHA256.fullmatch(meta.etag) else f.sha256  # an LFS file's ETag is its sha256
        if sha is not None and _sha256(part, Path(f.name).name, progress) != sha:
            part.unlink()
            raise HubError(f"{f.name}: the downloaded bytes do not match the sha256 the Hub lists ({sha[:12]}...); "
                           f"the partial file was removed, run the command again")
        os.replace(part, blob)


def _fetch(repo: str, revision: str, f: RemoteFile, progress: bool) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    url = hf_hub_url(repo, f.name, revision=revision)
    meta = get_hf_file_metadata(url)
    if not meta.etag or not meta.commit_hash:
        raise HubError(f"{_endpoint()} answered without the Hub's ETag / X-Repo-Commit headers for {f.name}; "
                       f"is HF_ENDPOINT a Hugging Face Hub?")
    if not (_repo_dir(repo) / "blobs" / meta.etag).is_file():
        _fill_blob(repo, f, url, meta, progress)
    # The blob is in place: this only links snapshots/<commit>/<name> to it and records refs/<revision>.
    return Path(hf_hub_download(repo, f.name, revision=revision))


def _announce(repo: str, todo: list[RemoteFile], need: int) -> str:
    if len(todo) <= 3:
        what = ", ".join(f"{f.name} ({size_text(f.size)})" for f in todo)
    else:
        what = f"{len(todo)} files, {size_text(sum(f.size or 0 for f in todo))}"
    resumed = sum(f.size or 0 for f in todo) - need
    more = f", resuming ({size_text(resumed)} already here)" if resumed > 0 else ""
    return f"Downloading {repo}: {what}{more} into {hf_cache_dir()}"


def _download(repo: str, revision: str, files: list[RemoteFile], say: Say, progress: bool) -> Path:
    """Fetch `files` (skipping those cached); returns the snapshot folder holding all of them."""
    blobs = _repo_dir(repo) / "blobs"
    todo = [f for f in files if not (f.blob and (blobs / f.blob).is_file())]
    need = 0
    for f in todo:
        part = blobs / f"{f.blob}.incomplete"
        need += max(0, (f.size or 0) - (part.stat().st_size if f.blob and part.is_file() else 0))
    if todo:
        _check_disk(repo, need)
        say(_announce(repo, todo, need))
    paths = [_fetch(repo, revision, f, progress) for f in files]
    snaps = {p.parents[f.name.count("/")] for p, f in zip(paths, files)}
    if len(snaps) > 1:
        raise HubError(f"{repo} changed on the Hub during the download; run the command again "
                       f"(the files already fetched are kept)")
    snap = snaps.pop()
    if todo:
        say(f"Cached in {snap} (later runs start from there without network access)")
    return snap


# ----------------------------------------------------------------------------------------------- entry points

def _quiet(msg: str) -> None:
    pass


def fetch_gguf(ref: HubRef | str, mmproj_quant: str | None = None, *, refresh: bool = False,
               say: Say = _quiet, progress: bool = True) -> tuple[Path, Path]:
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
    if snap is not None and (not refresh or _offline()):
        try:
            pair = select_gguf(_files_in(snap), ref.repo, ref.quant, ref.quant_given, mmproj_quant)
            return _ordered(snap / pair.lm[0], snap / pair.mmproj)
        except RepoFilesError as e:
            cached_note = f" ({e})"
    if _offline():
        raise HubError(_offline_message(what + cached_note, cmd))
    with _hub_errors(ref.repo, what, cmd):
        listing = _listing(ref.repo, ref.revision)
        pair: GGUFPair = select_gguf(listing, ref.repo, ref.quant, ref.quant_given, mmproj_quant)
        snap = _download(ref.repo, ref.revision, [listing[n] for n in pair.files], say, progress)
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


def fetch_checkpoint(repo: str, revision: str = "main", *, refresh: bool = False, say: Say = _quiet,
                     progress: bool = True) -> Path:
    """Snapshot folder of a Hugging Face checkpoint holding the files conversion reads
    (safetensors, index, configs, tokenizer files), from the cache or downloaded into it."""
    cmd = f"minicpm-convert {repo} -o OUT"
    snap = cached_snapshot(repo, revision)
    if snap is not None and (not refresh or _offline()) and _checkpoint_complete(snap):
        return snap
    if _offline():
        raise HubError(_offline_message(f"the checkpoint {repo}", cmd))
    with _hub_errors(repo, f"the checkpoint {repo}", cmd):
        listing = _listing(repo, revision)
        names = checkpoint_files(listing, repo)
        return _download(repo, revision, [listing[n] for n in names], say, progress)


# ----------------------------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class CachedModel:
    repo: str
    summary: str      # e.g. "Q4_K_M 5.03 GB, Q8_0 8.71 GB; mmproj F16 1.10 GB"
    use: str          # the command that runs (or converts) it
    path: Path        # the repo's folder in the cache


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
            models.append(CachedModel(r.repo_id, f"{part(lms)}; mmproj {part(mms)}",
                                      f"minicpm-run --hf {r.repo_id}{':' + first if first else ''}", r.repo_path))
            continue
        cfg = files.get("config.json")
        shards = {n: s for n, (s, _) in files.items() if n.endswith(".safetensors")}
        if cfg and shards:
            try:
                model_type = json.loads(cfg[1].read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            if model_type == "minicpmv":
                models.append(CachedModel(r.repo_id, f"checkpoint, {len(shards)} safetensors files, "
                                          f"{size_text(sum(shards.values()))}",
                                          f"minicpm-convert {r.repo_id} -o OUT", r.repo_path))
    partial: dict[str, int] = {}
    for inc in info.incomplete_files:
        folder = inc.file_path.parent.parent.name            # models--owner--name
        kind, _, rest = folder.partition("--")
        if kind == "models":
            repo = rest.replace("--", "/", 1)
            partial[repo] = partial.get(repo, 0) + inc.size_on_disk
    return models, sorted(partial.items())
