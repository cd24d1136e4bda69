"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1 (no network exists in the tests).

It answers only what huggingface_hub 2.x asks for the downloads in runtime/hub.py, the way the Hub does:
- GET  /api/models/OWNER/NAME[/revision/REV][?blobs=true]: repo info with its files (`siblings`:
  rfilename, size, blobId, and lfs.sha256/size for LFS files);
- HEAD/GET /OWNER/NAME/resolve/REV/PATH: X-Repo-Commit, ETag (the git blob id; for LFS files the
  sha256, also as X-Linked-Etag with X-Linked-Size), Content-Length, Accept-Ranges; GET honours
  `Range: bytes=N-` with 206 and Content-Range;
- errors carry the Hub's X-Error-Code: RepoNotFound (401, what anonymous callers get), GatedRepo (401),
  RevisionNotFound / EntryNotFound (404).
No Xet headers are sent, so huggingface_hub never turns to hf_xet. `cut[path] = n` makes every GET of
that file stop after byte n and drop the connection. Each request is appended to `log`; any request
outside this API to `unexpected` (answered 404).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".png")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    listed_sizes: dict[str, int] = field(default_factory=dict)  # sizes the listing claims instead

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        return h.hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data)


@dataclass
class Request:
    method: str
    path: str
    range: str | None


class HubStandIn:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.cut: dict[str, int] = {}
        self.log: list[Request] = []
        self.unexpected: list[Request] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "HubStandIn":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread = None

    def file_gets(self) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path]

    # ------------------------------------------------------------------------------------------ serving

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        req = Request("HEAD" if head else "GET", path, h.headers.get("Range"))
        with self._lock:
            self.log.append(req)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and not head:
            return self._info(h, m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(h, head, *m.groups())
        with self._lock:
            self.unexpected.append(req)
        self._error(h, 404, "NotFound", "unexpected request", head)

    def _error(self, h, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(0 if head else len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h, repo_id: str, revision: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found", head)
            return None
        if revision not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", "Invalid rev id: " + revision, head)
            return None
        return repo

    def _info(self, h, repo_id: str, revision: str) -> None:
        repo = self._repo(h, repo_id, revision, head=False)
        if repo is None:
            return
        siblings = []
        for name, data in sorted(repo.files.items()):
            size = repo.listed_sizes.get(name, len(data))
            s = {"rfilename": name, "size": size, "blobId": git_blob_id(data)}
            if is_lfs(name):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
            siblings.append(s)
        body = json.dumps(
            {
                "_id": "0" * 24,
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"],
                "siblings": siblings,
            }
        ).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _resolve(self, h, head: bool, repo_id: str, revision: str, name: str) -> None:
        repo = self._repo(h, repo_id, revision, head)
        if repo is None:
            return
        if repo.gated:
            return self._error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted.", head)
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", head, repo.commit)
        data = repo.files[name]
        start, end = 0, len(data) - 1
        rng = None if head else h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            start = int(m.group(1))
            end = min(int(m.group(2)), end) if m.group(2) else end
        tag = etag(name, data)
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{tag}"')
        if is_lfs(name):
            h.send_header("X-Linked-Etag", f'"{tag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(end - start + 1))
        h.end_headers()
        if head:
            return
        stop = self.cut.get(name)
        if stop is not None and stop <= end:
            if stop > start:
                h.wfile.write(data[start:stop])
            h.wfile.flush()
            h.close_connection = True  # the client sees the connection end in the middle of the body
            return
        h.wfile.write(data[start : end + 1])
