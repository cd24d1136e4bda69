"""Our servers in subprocesses for a test: the `--web` page and `minicpm-serve`, on a free loopback
port, started, waited for, and stopped afterwards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> tuple[int, dict]:
    """minicpm-serve's GET /health: (status, body); (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url + "health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


@contextmanager
def running(
    argv: list,
    log: Path,
    ready: Callable[[], bool],
    *,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    start_s: float = 180,
) -> Iterator[subprocess.Popen]:
    """Run `argv` (output to `log`) until `ready()` (within `start_s` seconds), then hand it over;
    terminate it after (killed if it does not end within 30 s)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(map(str, argv)), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + start_s
        while not ready():
            assert proc.poll() is None, f"{what} did not start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{what}: not ready in {start_s:g} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def page_process(
    argv: list,
    port: int,
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    start_s: float = 180,
) -> Iterator[str]:
    """A --web command serving on `port`: yields the page's URL once the command prints its
    "chat page at URL" line."""
    url = f"http://127.0.0.1:{port}/"
    with running(
        argv, log, lambda: f"chat page at {url}" in log.read_text(), what=repr(argv), cwd=cwd, env=env, start_s=start_s
    ):
        yield url


@contextmanager
def serve_command(
    argv: list, log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None, start_s: float = 180
) -> Iterator[str]:
    """A minicpm-serve command line (e.g. a README line as its words) + `--port N`: yields the base
    URL ("http://127.0.0.1:PORT/") once /health says ok."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(
        [*argv, "--port", port],
        log,
        lambda: health(url)[0] == 200,
        what="minicpm-serve",
        cwd=cwd,
        env=env,
        start_s=start_s,
    ):
        yield url


@contextmanager
def serve_process(args: list, log: Path, *, start_s: float = 180) -> Iterator[str]:
    """`python -m minicpmv.cli.serve ARGS --port N` (serve_command)."""
    with serve_command([sys.executable, "-m", "minicpmv.cli.serve", *args], log, start_s=start_s) as url:
        yield url
