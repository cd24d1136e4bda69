"""Start `minicpm-serve` in a subprocess for a test (a free loopback port), and stop it afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .web_server import free_port


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


@contextmanager
def serve_process(args: list, log: Path, *, start_s: float = 180) -> Iterator[str]:
    """Run minicpm-serve with `args` (plus --port), output to `log`; yield its base URL
    ("http://127.0.0.1:PORT/") once /health says ok; stop it (SIGTERM) after."""
    with serve_command([sys.executable, "-m", "minicpmv.cli.serve", *map(str, args)], log, start_s=start_s) as url:
        yield url


@contextmanager
def serve_command(
    argv: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None, start_s: float = 180
) -> Iterator[str]:
    """serve_process for a whole command line (e.g. a README line as its words): `argv` + `--port N`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + start_s
        while health(url)[0] != 200:
            assert proc.poll() is None, f"minicpm-serve did not start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"minicpm-serve: not ready in {start_s:g} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
