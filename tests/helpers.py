"""Helpers the test files share: running a command-line tool, and the one-line error rule."""

from __future__ import annotations

import subprocess
import sys

TOOLS = {
    "minicpm-run": "minicpmv.cli.run",
    "minicpm-convert": "minicpmv.cli.convert",
    "minicpm-imatrix": "minicpmv.cli.imatrix",
    "minicpm-serve": "minicpmv.cli.serve",
}


def run_cli(tool: str, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """One of our commands in a fresh interpreter, as a user runs it (arguments str()-ed)."""
    return subprocess.run(
        [sys.executable, "-m", TOOLS[tool], *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def run_in_process(tool: str, *args):
    """The same command through typer's CliRunner (no interpreter start; faster, same checks)."""
    import importlib

    from typer.testing import CliRunner

    app = importlib.import_module(TOOLS[tool]).app
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res, *needles: str, prog: str | None = None, code: int | None = 2) -> str:
    """The rule for bad input: a non-zero exit (`code` when given) and exactly one line on stderr,
    "PROG: error: ..." when `prog` is given, holding every needle. Returns that line.
    `res`: a CompletedProcess or a CliRunner Result."""
    rc = res.returncode if hasattr(res, "returncode") else res.exit_code
    assert rc != 0, f"exit {rc}: {res.stderr}"
    if code is not None:
        assert rc == code, f"exit {rc}, expected {code}: {res.stderr}"
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    if prog is not None:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def load_exact(lm, mm, **kw):
    """A model whose answers do not depend on how positions were batched or which prefix was
    reused: a float32 KV cache without flash attention, float32 vision, one thread (MiniCPMV.load's
    docstring); greedy answers then match token for token (the oracle of the concurrency tests)."""
    from minicpmv.runtime import MiniCPMV

    return MiniCPMV.load(lm, mm, **{"n_threads": 1, "vision_dtype": "f32", "kv_type": "f32", "flash_attn": False, **kw})


def answers_alone(model, conversations: list, max_new_tokens: int) -> list[list[int]]:
    """Each conversation's greedy tokens, asked alone on a cleared cache."""
    out = []
    for msgs in conversations:
        model.reset()
        out.append(model.chat(msgs, greedy=True, max_new_tokens=max_new_tokens).tokens)
    model.reset()
    return out
