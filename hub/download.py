"""Downloading a repo's files into the Hugging Face cache, resumably, with one-line errors.

huggingface_hub 2.x deletes its own partial files, so the bytes are fetched here (its http_get,
plain HTTP, no hf_xet) into `blobs/<etag>.incomplete`, the name its cache scanner knows, continued
with a Range request after an interruption, checked against the sha256 the Hub lists (LFS files),
and the finished blob handed to hf_hub_download, which links it into the snapshot.
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

from .cache import endpoint, hf_cache_dir, repo_dir

Say = Callable[[str], None]
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(ValueError):
    """A Hub download or cache lookup failed; the message is one line saying what to do."""


class RepoNotFoundError(HubError):
    """The Hub has no such repo (or it is private and no valid token was sent)."""


def reason(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextmanager
def hub_errors(repo: str, what: str, download_cmd: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line HubErrors."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{repo} is gated: accept its conditions on {endpoint()}/{repo}, then {login}") from None
    except RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"{repo}: repository not found on the Hub ({endpoint()}); check the name, or if it is private {login}"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: revision not found on the Hub") from None
    except RemoteEntryNotFoundError as e:
        raise HubError(f"{repo}: a file is missing on the Hub ({reason(e)}); the repo changed, run again") from None
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code == 401:
            raise HubError(f"{repo}: the Hub refused the credentials (HTTP 401); {login} again") from None
        if code == 403:
            raise HubError(f"{repo}: access denied (HTTP 403); {login} with an account that may read it") from None
        raise HubError(f"{repo}: the Hub answered HTTP {code} ({reason(e)}); try again later") from None
    except OfflineModeIsEnabled:
        raise HubError(offline_message(what, download_cmd)) from None
    except httpx2.TransportError as e:
        raise HubError(
            f"cannot reach the Hub at {endpoint()} ({reason(e)}) and {what} is not in the cache "
            f"{hf_cache_dir()}; connect to the network and run the command again"
        ) from None
    except OSError as e:  # e.g. HF_ENDPOINT answering without the Hub's headers, or the cache not writable
        raise HubError(f"{what}: {reason(e)}") from None


def offline_message(what: str, download_cmd: str) -> str:
    return (
        f"offline (HF_HUB_OFFLINE is set) and {what} is not in the cache {hf_cache_dir()}; "
        f"run `{download_cmd}` once with network access to download it"
    )


# ----------------------------------------------------------------------------------------------- downloads


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repo
    size: int | None
    sha256: str | None  # LFS files: the content hash the Hub lists
    blob_id: str | None  # git object id (the ETag of a non-LFS file)

    @property
    def blob(self) -> str | None:
        """Its expected name in blobs/ (the Hub's ETag: sha256 for LFS files, else the git id)."""
        return self.sha256 or self.blob_id


def list_repo(repo: str, revision: str) -> dict[str, RemoteFile]:
    """All files of the repo at `revision` with sizes and hashes: one API request."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    out = {}
    for s in info.siblings or []:
        lfs = s.lfs
        out[s.rfilename] = RemoteFile(s.rfilename, lfs.size if lfs else s.size, lfs.sha256 if lfs else None, s.blob_id)
    return out


def _check_disk(repo: str, need: int) -> None:
    where = hf_cache_dir()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need + need // 100 > free:  # keep 1% spare: a disk filled to the last byte hurts everything else
        raise HubError(
            f"not enough free disk space for {repo}: {size_text(need)} to download, "
            f"{size_text(free)} free in {where}; free some space or point HF_HOME at a larger disk"
        )


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
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            leave=False,
            desc=f"checking {name}",
            disable=not progress,
        ) as bar,
    ):
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

    rdir = repo_dir(repo)
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
                http_get(
                    meta.location,
                    out,
                    resume_size=have,
                    headers=headers,
                    expected_size=size,
                    displayed_filename=Path(f.name).name,
                    tqdm_class=None if progress else _NoBar,
                )
        except HfHubHTTPError:
            raise
        except (httpx2.TransportError, OSError) as e:
            got = part.stat().st_size if part.is_file() else 0
            if got == 0:
                part.unlink(missing_ok=True)
            raise HubError(
                f"download of {f.name} interrupted at {size_text(got)} of {size_text(size)} "
                f"({reason(e)}); run the same command again to resume"
            ) from None
        sha = meta.etag if _SHA256.fullmatch(meta.etag) else f.sha256  # an LFS file's ETag is its sha256
        if sha is not None and _sha256(part, Path(f.name).name, progress) != sha:
            part.unlink()
            raise HubError(
                f"{f.name}: the downloaded bytes do not match the sha256 the Hub lists ({sha[:12]}...); "
                f"the partial file was removed, run the command again"
            )
        os.replace(part, blob)


def _fetch(repo: str, revision: str, f: RemoteFile, progress: bool) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(repo, f.name, revision=revision)
    meta = get_hf_file_metadata(url)
    if not meta.etag or not meta.commit_hash:
        raise HubError(
            f"{endpoint()} answered without the Hub's ETag / X-Repo-Commit headers for {f.name}; "
            f"is HF_ENDPOINT a Hugging Face Hub?"
        )
    if not (repo_dir(repo) / "blobs" / meta.etag).is_file():
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


def download(repo: str, revision: str, files: list[RemoteFile], say: Say, progress: bool) -> Path:
    """Fetch `files` (skipping those cached); returns the snapshot folder holding all of them."""
    blobs = repo_dir(repo) / "blobs"
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
        raise HubError(
            f"{repo} changed on the Hub during the download; run the command again (the files already fetched are kept)"
        )
    snap = snaps.pop()
    if todo:
        say(f"Cached in {snap} (later runs start from there without network access)")
    return snap
