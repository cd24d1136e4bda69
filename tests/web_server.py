"""Start a `minicpm-run --web` page in a subprocess for a test, and stop it afterwards."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def page_process(
    argv: list[str],
    port: int,
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    start_s: float = 180,
) -> Iterator[str]:
    """Run `argv` (a --web command serving on `port`), output to `log`; yield the page's URL once
    the command prints its "chat page at URL" line (within `start_s` seconds); terminate it after."""
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_s
        while f"chat page at {url}" not in log.read_text():
            assert proc.poll() is None, f"{argv!r} did not start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{argv!r}: no page in {start_s:g} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
