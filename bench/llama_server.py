"""llama.cpp's own server (`llama-server`), built once from the sources of the installed llama-cpp-python,
as the peer of §4d (several conversations at once).

- `build(cache, log)`: the pinned sources (the llama-cpp-python sdist of the installed version, fetched
  with pip as tests/llama_sources.py does, but with `vendor/llama.cpp` extracted whole) and the
  `llama-server` target alone, built with cmake into `<cache>/llama-server/<version>/` and kept there;
  a failure is a Skip naming why. `$MINICPMV_LLAMA_SERVER` names an existing binary instead.
- `LlamaServer`: start it on a free loopback port with N slots of `slot_ctx` cells each, wait until it
  answers /health, send concurrent streamed `/completion` requests, stop it.

The build flags: no -march=native (`GGML_NATIVE=OFF`), the x86 features this CPU reports, and AMX off:
llama.cpp's AMX weight buffers crash the llama.cpp of llama-cpp-python 0.3.36 (runtime/weight_buffers.py),
and without AMX compiled in llama-server's own weight placement is CPU_REPACK, the same as ours.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from .common import Skip, stop_process

ENV = "MINICPMV_LLAMA_SERVER"
# /proc/cpuinfo flag -> ggml's cmake option (GGML_NATIVE=OFF turns each one on explicitly)
X86_FEATURES = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
FIXED_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary: nothing to find at run time
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS (and no model downloads); llama.cpp has no curl option any more
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives under tools/
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",  # the web UI would need npm
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... or a download: the server is built with an empty asset table
]


def version() -> str:
    return metadata.version("llama-cpp-python")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_options() -> list[str]:
    flags = cpu_flags()
    return FIXED_OPTIONS + [f"-D{opt}={'ON' if f in flags else 'OFF'}" for f, opt in X86_FEATURES.items()]


def _run(cmd: list[str], log: Path, **kw) -> int:
    with open(log, "a") as lf:
        lf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        lf.flush()
        return subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, **kw).returncode


def sources(root: Path, log: Path) -> Path:
    """`vendor/llama.cpp` of the installed version's sdist, extracted whole under `root` (once)."""
    src = root / "src"
    if (src / "tools" / "server" / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version()}", "--no-deps"]
        rc = _run(cmd + ["--no-binary", ":all:", "-d", tmp], log)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if rc != 0 or not sdists:
            raise Skip(f"llama-server: cannot download the llama-cpp-python {version()} sources (pip exit {rc})")
        out = Path(tmp) / "x"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(out, members=members, filter="data")
        found = next(out.glob("*/vendor/llama.cpp"), None)
        if found is None:
            raise Skip(f"llama-server: the llama-cpp-python {version()} sdist has no vendor/llama.cpp")
        shutil.rmtree(src, ignore_errors=True)
        found.rename(src)
    return src


def built(cache: Path) -> bool:
    """Whether `build` would find the binary made (or named) already."""
    return bool(os.environ.get(ENV)) or (cache / "llama-server" / version() / "build.json").is_file()


def build(cache: Path, log: Path, jobs: int) -> tuple[Path, dict]:
    """The llama-server binary and what its build was ({"seconds", "options", "cached"}); built on
    first use (sources, configure, the one target), reused afterwards."""
    env = os.environ.get(ENV)
    if env:
        if not os.access(env, os.X_OK):
            raise Skip(f"llama-server: ${ENV}={env} is not an executable")
        made = Path(env).parent.parent / "build.json"  # one that this module built, in another cache folder
        info = json.loads(made.read_text()) if made.is_file() else {"seconds": None, "options": []}
        return Path(env), info | {"cached": True, "path": env}
    root = cache / "llama-server" / version()
    binary, info_file = root / "bin" / "llama-server", root / "build.json"
    if binary.is_file() and info_file.is_file():
        return binary, json.loads(info_file.read_text()) | {"cached": True}
    if shutil.which("cmake") is None or (shutil.which("c++") or shutil.which("g++")) is None:
        raise Skip("llama-server: cmake and a C++ compiler are needed to build it")
    t0 = time.perf_counter()
    src = sources(root, log)
    t_src = time.perf_counter() - t0
    bdir = root / "build"
    opts = cmake_options()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # niced: the build may run beside other measurements on the machine
    if _run(["nice", "-n", "10", "cmake", "-S", str(src), "-B", str(bdir), *gen, *opts], log) != 0:
        raise Skip(f"llama-server: cmake configure failed (log {log})")
    t1 = time.perf_counter()
    rc = _run(["nice", "-n", "10", "cmake", "--build", str(bdir), "--target", "llama-server", "-j", str(jobs)], log)
    built = bdir / "bin" / "llama-server"
    if rc != 0 or not built.is_file():
        raise Skip(f"llama-server: the build failed (exit {rc}; log {log})")
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    info = {
        "seconds": time.perf_counter() - t1,
        "fetch_seconds": t_src,
        "options": opts,
        "jobs": jobs,
        "version": version(),
        "path": str(binary),
    }
    info_file.write_text(json.dumps(info, indent=1))
    shutil.rmtree(bdir, ignore_errors=True)  # ~1 GB of objects; the binary is what is kept
    return binary, info | {"cached": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server -m LM -np N -c N*slot_ctx` on loopback: N slots of slot_ctx cells each (non-unified
    KV cache, as BatchChat's), threads T, llama.cpp's defaults otherwise."""

    def __init__(
        self, binary: Path, lm: str, n_slots: int, slot_ctx: int, threads: int, log: Path, timeout: float = 600.0
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            str(binary),
            "-m",
            lm,
            "-np",
            str(n_slots),
            "-c",
            str(n_slots * slot_ctx),
            "--no-kv-unified",  # the default except with -np auto; said so that each slot surely has slot_ctx cells
            "-t",
            str(threads),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--no-webui",
        ]
        self.log = log
        self._lf = open(log, "a")
        self._lf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        self._lf.flush()
        self.proc = subprocess.Popen(cmd, stdout=self._lf, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self._lf.close()
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} while loading (log {log})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() - t0 > timeout:
                self.close()
                raise RuntimeError(f"llama-server did not become ready in {timeout:.0f} s (log {log})")
            time.sleep(0.5)
        self.load_s = time.perf_counter() - t0

    def peak_rss_gb(self) -> float | None:
        """The server process's own VmHWM so far."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
        except (OSError, ValueError):
            pass
        return None

    def stream(self, body: dict, t0: float) -> dict:
        """One streamed /completion: the arrival time (seconds since t0) of every chunk with the count
        of tokens generated so far (`tokens_predicted`: a token that ends inside a UTF-8 character is
        sent with the next one), and the final chunk's timings."""
        req = urllib.request.Request(
            self.url + "/completion",
            data=json.dumps(body | {"stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        marks: list[tuple[float, int]] = []
        final: dict = {}
        with urllib.request.urlopen(req, timeout=3600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                d = json.loads(line[5:])
                t = time.perf_counter() - t0
                if "tokens_predicted" in d and not d.get("prompt_progress"):
                    marks.append((t, int(d["tokens_predicted"])))
                if d.get("stop"):
                    final = d
        return {
            "marks": marks,
            "n_gen": marks[-1][1] if marks else 0,
            "timings": final.get("timings", {}),
            "tokens_evaluated": final.get("tokens_evaluated"),
            "stop_type": final.get("stop_type"),
        }

    def concurrent(self, bodies: list[dict]) -> list[dict]:
        """Send `bodies` at once, one thread each; every result's marks are on one clock."""
        out: list[dict | BaseException | None] = [None] * len(bodies)
        t0 = time.perf_counter()

        def one(i: int) -> None:
            try:
                out[i] = self.stream(bodies[i], t0)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out  # type: ignore[return-value]

    def tokenize(self, text: str) -> list[int]:
        req = urllib.request.Request(
            self.url + "/tokenize",
            data=json.dumps({"content": text, "parse_special": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["tokens"]

    def close(self) -> None:
        stop_process(self.proc)
        self._lf.close()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
