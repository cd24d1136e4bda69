"""A killed conversion leaves the complete set or nothing (issue 20): SIGTERM and SIGHUP are handled
like Ctrl-C, and leftovers of a process that died without cleanup (SIGKILL) are removed by the next
run into the same folder."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minicpmv.convert.writer import TEMP_PREFIX

# minicpm-convert that stops for good once it has written (STOP_IN=main) or encoded (STOP_IN=encoder)
# two tensors of the file named by STALL (the language model's "blk." tensors or the mmproj's "v."
# ones). A stop, not a slowdown: on a busy machine the test could otherwise see the partial file only
# after the conversion had finished. The main thread stops in short sleeps: the kernel may hand the
# test's signal to any thread, and Python sees it only when the main thread wakes. STOP_IN=encoder
# sends the signal to the encoder thread itself, then blocks that thread: the main thread, waiting for
# a block that never comes, must notice the signal on its own (convert/writer.py, _blocks).
DRIVER = textwrap.dedent("""
    import os, signal, sys, threading, time
    import minicpmv.convert.writer as w
    real, stall, stop_in = w._blocks, os.environ["STALL"], os.environ["STOP_IN"]
    def stopping(plans, encode):
        seen, encoded = set(), set()
        def encode_then_stop(x, p):
            if stop_in == "encoder" and p.name.startswith(stall):
                encoded.add(p.name)
                if len(encoded) == 3:
                    signal.pthread_kill(threading.get_ident(), int(os.environ["SIG"]))
                    time.sleep(3600)
            return encode(x, p)
        for item in real(plans, encode_then_stop):
            yield item   # written by the caller before the next item is asked for
            if stop_in == "main" and item[0].name.startswith(stall):
                seen.add(item[0].name)
                while len(seen) == 2:
                    time.sleep(0.05)
    w._blocks = stopping
    from minicpmv.cli.convert import main
    sys.argv = ["minicpm-convert"] + sys.argv[1:]
    main()
""")
STALL = {"mmproj-": "v.", "MiniCPM-V-4.5-": "blk."}  # file name prefix -> its tensors' name prefix


def start(
    ckpt: Path, out: Path, *extra: str, during: str = "mmproj-", stop_in: str = "main", sig: int = signal.SIGTERM
) -> subprocess.Popen:
    # SIGINT back to its default first: a shell starts background jobs with SIGINT ignored, Python then
    # keeps it ignored (as `nohup minicpm-convert ... &` should), and Ctrl-C could not be tested.
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(ckpt), "-o", str(out), "--quant", "Q8_0", "--ollama", "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "STALL": STALL[during], "STOP_IN": stop_in, "SIG": str(int(sig))},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    """stderr of the ended process; a process that did not end in time is killed, not left asleep."""
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()


def wait_for(out: Path, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a temporary file whose final name starts with `prefix` exists (and has data)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before the signal: {proc.stderr.read()}")
        if out.is_dir():
            for f in out.iterdir():
                if (
                    f.name.startswith(TEMP_PREFIX)
                    and f.name.split(".", 3)[-1].startswith(prefix)
                    and f.stat().st_size > 0
                ):
                    return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no temporary file for {prefix} appeared")


def written(out: Path) -> list[str]:
    return sorted(f.name for f in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize(
    "sig, code, during",
    [
        (signal.SIGTERM, 143, "mmproj-"),  # the LM is complete, the mmproj half written
        (signal.SIGHUP, 129, "MiniCPM-V-4.5-"),  # the LM half written
        (signal.SIGINT, 130, "mmproj-"),  # Ctrl-C
    ],
)
def test_signal_leaves_nothing(tiny_ckpt, tmp_path, sig, code, during):
    out = tmp_path / "out"
    proc = start(tiny_ckpt, out, during=during)
    wait_for(out, during, proc)
    proc.send_signal(sig)
    check_interrupted(proc, out, sig, code)


@pytest.mark.parametrize(
    "sig, code, during", [(signal.SIGTERM, 143, "mmproj-"), (signal.SIGINT, 130, "MiniCPM-V-4.5-")]
)
def test_signal_handled_by_a_worker_thread_still_stops_the_conversion(tiny_ckpt, tmp_path, sig, code, during):
    """The encoder thread gets the signal and then hangs: the main thread, waiting for its next block,
    must still see the signal (before the fix it waited for that block for ever)."""
    out = tmp_path / "out"
    proc = start(tiny_ckpt, out, during=during, stop_in="encoder", sig=sig)
    check_interrupted(proc, out, sig, code, timeout=60)


def check_interrupted(proc: subprocess.Popen, out: Path, sig: int, code: int, timeout: float = 120) -> None:
    err = finish(proc, timeout)
    assert proc.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0] and "no output written" in lines[0], err
    assert written(out) == []


def test_force_keeps_the_old_set_until_the_new_one_is_complete(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "minicpmv.cli.convert",
            str(tiny_ckpt),
            "-o",
            str(out),
            "--quant",
            "Q8_0",
            "--ollama",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    before = {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in written(out)}
    assert len(before) == 3
    proc = start(tiny_ckpt, out, "--force")
    wait_for(out, "mmproj-", proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert proc.returncode == 143
    assert {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in written(out)} == before


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = start(tiny_ckpt, out)
    wait_for(out, "mmproj-", proc)
    proc.send_signal(signal.SIGKILL)  # no cleanup possible: the temporary files stay
    finish(proc, timeout=60)
    left = [f for f in written(out) if f.startswith(TEMP_PREFIX)]
    assert len(left) == 2, written(out)
    size = sum((out / f).stat().st_size for f in left)
    # a temporary file of a process that is still alive is not touched
    alive = out / f"{TEMP_PREFIX}{os.getppid()}.other.gguf"
    alive.write_bytes(b"x" * 10)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "minicpmv.cli.convert",
            str(tiny_ckpt),
            "-o",
            str(out),
            "--quant",
            "Q8_0",
            "--ollama",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "removed 2 unfinished files" in lines[0], r.stderr
    assert f"({size / 1e9:.2f} GB freed)" in lines[0]
    assert written(out) == sorted(["MiniCPM-V-4.5-Q8_0.gguf", "mmproj-MiniCPM-V-4.5-F16.gguf", "Modelfile", alive.name])
