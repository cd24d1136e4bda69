"""The llama.cpp sources that the installed llama-cpp-python was built from, for the C++ probes.

Some oracles compile a few lines of our C++ against llama.cpp's own headers and link the libmtmd.so
that llama-cpp-python ships. The headers come from the same release's source distribution, fetched
once with pip (from whatever index pip is configured for) into `.cache/llama-src/` and reused.
`LLAMA_CPP_SRC` points at an existing `vendor/llama.cpp` folder instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "llama-src"
PROBE = Path("tools") / "mtmd" / "mtmd-image.h"  # a header the probes need


def llama_cpp_source_dir() -> Path:
    """`vendor/llama.cpp` of the installed llama-cpp-python's sdist (downloaded on first use)."""
    env = os.environ.get("LLAMA_CPP_SRC")
    if env:
        root = Path(env)
        if not (root / PROBE).is_file():
            raise FileNotFoundError(f"LLAMA_CPP_SRC={env}: no {PROBE} there")
        return root
    version = metadata.version("llama-cpp-python")
    root = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (root / PROBE).is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={version}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"cannot download the llama-cpp-python {version} sources: {r.stderr[-500:]}")
        with tarfile.open(sdists[0]) as tar:
            members = [
                m
                for m in tar.getmembers()  # the headers are all the probes need
                if m.isfile() and "/vendor/llama.cpp/" in m.name and m.name.endswith((".h", ".hpp"))
            ]
            tar.extractall(CACHE, members=members, filter="data")
    if not (root / PROBE).is_file():
        raise RuntimeError(f"llama-cpp-python {version} sources have no {PROBE}")
    return root
