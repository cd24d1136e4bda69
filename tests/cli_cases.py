"""Run many CLI cases on damaged files in one process (the bulk of tests/test_fuzz_damaged_files.py:
one interpreter start for hundreds of cases instead of one each).

    python -m tests.cli_cases CASES.json

CASES.json is a list of {"id", "app" (module of a typer app, e.g. "minicpmv.cli.run"), "args",
"damage" (see `damage`), "out" (optional: a folder whose files are listed after the case)}. For
each case the damaged copy is made, the CLI runs in this process (typer's CliRunner: the code of the
entry point, with its stdout and stderr captured), the copy is removed and one JSON line is printed:
{"id", "exit", "stdout", "stderr", "exception", "outputs" (file name -> sha256)}. A line
{"id", "started"} comes first, so a case that kills the process (a signal) or hangs (faulthandler ends the process after
CASE_TIMEOUT_S) is known by the last one started.
"""

from __future__ import annotations

import faulthandler
import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

CASE_TIMEOUT_S = 60


def damage(spec: dict) -> Path:
    """Make the damaged copy `dst` of `src` (a file, or with "folder" a folder whose file `file` is
    damaged, the others linked): the first `truncate` bytes, the byte at `offset` XORed with `xor`,
    or `content_hex` instead. Returns what to remove afterwards."""
    if "folder" in spec:
        src, dst = Path(spec["src"]), Path(spec["dst"])
        dst.mkdir()
        for f in src.iterdir():
            if f.name != spec["file"]:
                (dst / f.name).symlink_to(f)
        src, target, made = src / spec["file"], dst / spec["file"], dst
    else:
        src, target = Path(spec["src"]), Path(spec["dst"])
        made = target
    if "content_hex" in spec:
        data = bytearray.fromhex(spec["content_hex"])
    else:
        data = bytearray(src.read_bytes())
        if "truncate" in spec:
            del data[spec["truncate"] :]
        else:
            data[spec["offset"]] ^= spec["xor"]
    target.write_bytes(data)
    return made


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def outputs(case: dict) -> dict[str, str]:
    """The files the case wrote into its "out" folder (name -> sha256); the folder is removed."""
    out = Path(case["out"]) if case.get("out") else None
    if out is None or not out.exists():
        return {}
    found = {f.name: sha256(f) for f in sorted(out.iterdir())}
    remove(out)
    return found


def main(cases_file: str) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    for case in json.loads(Path(cases_file).read_text()):
        print(json.dumps({"id": case["id"], "started": True}), flush=True)
        app = importlib.import_module(case["app"]).app
        made = damage(case["damage"])
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        try:
            res = runner.invoke(app, case["args"])
        finally:
            faulthandler.cancel_dump_traceback_later()
            remove(made)
        exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
        print(
            json.dumps(
                {
                    "id": case["id"],
                    "exit": res.exit_code,
                    "stdout": res.stdout,
                    "stderr": res.stderr,
                    "exception": None if exc is None else f"{type(exc).__name__}: {exc}",
                    "outputs": outputs(case),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
