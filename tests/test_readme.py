"""Every example in README.md runs as written (issue 18), wherever it needs no outside service.

The examples are read from README.md itself (tests/readme_blocks.py): each fenced block is named in
EXAMPLES by its language tag and a piece of text only it contains, and a block no entry names, or an
entry whose block is gone, fails `test_every_readme_block_is_a_known_example`. So a README edit that
breaks, drops or adds an example fails the suite until the example runs again (or is listed here).

How they run: shell blocks with `bash -e` in a temporary folder that holds the files the example
names (photo.jpg is a 1280x960 noise photo, over 1 MB as a JPEG; a.jpg, b.jpg, puzzle.png; clip.mp4
from tests/video_fixtures.py; GGUFs and checkpoints are the tiny synthetic model's, under the names
the example uses), this venv's commands first on PATH. Nothing in a command is replaced except:
- `--hf`, the default model and `minicpm-convert openbmb/MiniCPM-V-4_5` talk to the local Hub
  stand-in (tests/hub_standin.py, through HF_ENDPOINT and a temporary HF_HOME, as tests/test_hub.py
  does), which serves the tiny model's files under the published repo and file names. This runs the
  lines exactly as written, the first-run download included, instead of listing them as needing
  the Hub;
- the Ollama and llama-server curl examples' server address (`http://localhost:11434`,
  `http://127.0.0.1:8080`) becomes a local receiver that records the request; curl itself runs, with
  only python3 and curl on PATH (the tools the README says the example needs). The body is checked
  against what the receiving server accepts (tests/chat_requests.py) and its images decoded back to
  the photo's bytes;
- `--web` lines get `--port N` (a free port) appended: they start the page, the test fetches it and
  stops the server (the page itself is tests/test_web_browser.py's);
- the `minicpm-serve` line likewise gets `--port N` and runs until /health answers 200; its three
  client examples (`openai`, curl, `ollama`) then run against it with `http://127.0.0.1:8080`, the
  address they hard-code (the server's default, checked), replaced by the server's, and nothing else:
  the Python ones with `python`, the curl one with only python3 and curl on PATH. Each one's output
  is checked (the answer, token count and timing printed; curl's chat.completion JSON);
- a line introduced by "# or ..." is the alternative to the line before it, so it runs in a fresh
  folder instead of after it (it would refuse to overwrite the first one's output);
- the Python API block runs unchanged with `python` in its folder; its Hub alternative runs with the
  folder line replaced by the two commented lines under "# or from the Hub", uncommented.

Deliberately not run (NOT_RUN says why for each block): `make install`/`make test` (.ci/run runs
them), `pip install`, and the lines of Ollama, llama-mtmd-cli and llama-server, which need those
programs: for them the test checks what can be checked here (the files they name are the ones
minicpm-convert writes, the model name matches, the sampling flags match the request example's).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import typer
from gguf import Keys
from PIL import Image

from minicpmv.cli.run import app as run_app
from minicpmv.cli.serve import app as serve_app
from minicpmv.gguf_info import read_gguf_info

from . import ollama_modelfile_parser
from .chat_requests import check_llama_server_chat, check_ollama_chat, strict_b64decode
from .hub_standin import HubStandIn, Repo
from .processes import free_port, health, page_process, serve_command
from .readme_blocks import README, Command, fenced_blocks, find, inline_code, shell_commands
from .test_hub import hub_env
from .video_fixtures import make_video

pytestmark = pytest.mark.slow

REPO = README.parent
MARKDOWN = README.read_text()
BLOCKS = fenced_blocks(MARKDOWN)

# name -> (language tag, text that only this block contains)
EXAMPLES = {
    "set-up": ("sh", "make test"),
    "quickstart": ("sh", 'minicpm-run photo.jpg "What is in the image?"'),
    "hub-variants": ("sh", "minicpm-run --hf openbmb/MiniCPM-V-4_5-gguf:Q8_0"),
    "convert-yourself": ("sh", "minicpm-convert openbmb/MiniCPM-V-4_5 "),
    "web": ("sh", "minicpm-run --web"),
    "openbmb-files": ("sh", "--model ggml-model-Q4_K_M.gguf --mmproj mmproj-model-f16.gguf"),
    "python-api": ("python", "MiniCPMV.load("),
    "serve": ("sh", "minicpm-serve --model-dir"),
    "serve-openai": ("python", "from openai import OpenAI"),
    "serve-curl": ("bash", '"max_tokens": 256'),
    "serve-ollama": ("python", "ollama.Client("),
    "ollama": ("bash", "ollama create"),
    "ollama-api": ("bash", "/api/chat"),
    "llama-mtmd-cli": ("bash", "llama-mtmd-cli"),
    "llama-server": ("bash", "llama-server -m"),
    "llama-server-api": ("bash", '"repeat_penalty"'),
    "imatrix": ("sh", "minicpm-imatrix ./photos"),
    "imatrix-calibration": ("json lines", '"image": "photos/'),
}
NOT_RUN = {
    "set-up": "installs the package and runs this suite; .ci/run runs both lines (checked to be there)",
    "llama-mtmd-cli": "needs llama.cpp's llama-mtmd-cli; its file names and sampling flags are checked",
    "llama-server": "needs llama.cpp's llama-server; its file names are checked",
}
# Inline commands of the prose that run as they are (printing ones, the "Which one to use" table).
INLINE_COMMANDS = {
    "version": "minicpm-run --version",
    "list-cached": "minicpm-run --list-cached",
    "synthetic": "python -m minicpmv.convert.synthetic --scale tiny|medium|full OUT",
    "table-video": 'minicpm-run --model-dir OUT clip.mp4 "What happens?"',
    "table-web": "minicpm-run --model-dir OUT --web",
    "low-memory": 'minicpm-run --model-dir OUT --low-memory photo.jpg "What is in the image?"',
}
OLLAMA_URL, LLAMA_SERVER_URL = "http://localhost:11434", "http://127.0.0.1:8080"
SERVE_URL = "http://127.0.0.1:8080"  # minicpm-serve's default address, which its client examples name
ARG_MAX_STRLEN = 128 * 1024  # Linux: the longest single command-line argument (MAX_ARG_STRLEN)


def example(name: str) -> str:
    return find(BLOCKS, name, *EXAMPLES[name]).text


def test_every_readme_block_is_a_known_example():
    found = {name: find(BLOCKS, name, *EXAMPLES[name]) for name in EXAMPLES}
    assert len(set(found.values())) == len(found), "two EXAMPLES entries name the same block"
    unknown = [str(b) for b in BLOCKS if b not in found.values()]
    assert not unknown, f"README blocks this test does not know (add them to EXAMPLES and run them): {unknown}"
    assert set(NOT_RUN) <= set(EXAMPLES)
    spans = set(inline_code(MARKDOWN))
    gone = [c for c in INLINE_COMMANDS.values() if c not in spans]
    assert not gone, f"inline README commands this test runs are gone or changed: {gone}"


# ------------------------------------------------------------------------------------------ files


def _noise_picture(width: int, height: int, seed: int) -> Image.Image:
    """Noise: a JPEG cannot shrink it, so a 1280x960 one is as large as a phone photo (~1.4 MB)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    _noise_picture(1280, 960, 0).save(d / "photo.jpg", quality=95)
    assert (d / "photo.jpg").stat().st_size > 1_000_000
    _noise_picture(320, 240, 1).save(d / "a.jpg")
    _noise_picture(240, 320, 2).save(d / "b.jpg")
    _noise_picture(300, 200, 3).save(d / "puzzle.png")
    make_video(d / "clip.mp4", n_frames=30, fps=10)
    return {p.name: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def tiny(tiny_lm_gguf, tiny_mmproj_gguf) -> dict[str, Path]:
    return {**{q: tiny_lm_gguf(q) for q in ("Q4_K_M", "Q8_0", "Q6_K", "F16")}, "mmproj": tiny_mmproj_gguf("f16")}


def minicpmv_gguf(tiny: dict[str, Path]) -> dict[str, Path]:
    """./minicpmv-gguf as the convert example writes it, holding the tiny Q4_K_M and f16 mmproj."""
    return {
        "minicpmv-gguf/MiniCPM-V-4.5-Q4_K_M.gguf": tiny["Q4_K_M"],
        "minicpmv-gguf/mmproj-MiniCPM-V-4.5-F16.gguf": tiny["mmproj"],
    }


def workdir(root: Path, media: dict[str, Path], **files: Path) -> Path:
    """`root` with the media files and `files` (relative name -> source file or folder, copied)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src in {**media, **files}.items():
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return root


def local_env(home: Path, endpoint: str = "http://127.0.0.1:9") -> dict[str, str]:
    """test_hub's clean environment (Hub at `endpoint`, nothing else reachable), the session's private
    MINICPMV_CACHE, and this venv's commands (minicpm-run, python) first on PATH."""
    env = hub_env(home, endpoint, MINICPMV_CACHE=os.environ["MINICPMV_CACHE"], COLUMNS="200")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def sh(script: str, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """README lines through bash, stopping at the first that fails."""
    res = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"exit {res.returncode} from README lines\n{script}\n--- stderr:\n{res.stderr[-4000:]}"
    return res


@pytest.fixture
def hub(tiny, tiny_ckpt):
    """The published repos as the examples name them, holding the tiny model's files."""
    b = {k: p.read_bytes() for k, p in tiny.items()}
    s = HubStandIn(
        {
            "openbmb/MiniCPM-V-4_5-gguf": Repo(
                {
                    "ggml-model-Q4_K_M.gguf": b["Q4_K_M"],
                    "ggml-model-Q8_0.gguf": b["Q8_0"],
                    "mmproj-model-f16.gguf": b["mmproj"],
                }
            ),
            "you/minicpmv-gguf": Repo(
                {"MiniCPM-V-4.5-Q6_K.gguf": b["Q6_K"], "mmproj-MiniCPM-V-4.5-F16.gguf": b["mmproj"]}
            ),
            "openbmb/MiniCPM-V-4_5": Repo({p.name: p.read_bytes() for p in tiny_ckpt.iterdir() if p.is_file()}),
        }
    ).start()
    yield s
    s.stop()
    assert not s.unexpected, f"requests outside the Hub API subset: {s.unexpected}"


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    e = local_env(tmp_path / "home", hub.endpoint)
    assert shutil.which("minicpm-run", path=e["PATH"]) == str(Path(sys.executable).parent / "minicpm-run")
    return e


def fetched(hub: HubStandIn) -> list[str]:
    return sorted(r.path.rsplit("/", 1)[1] for r in hub.file_gets())


# ------------------------------------------------------------------------- minicpm-run / convert


def test_quickstart_downloads_the_default_model_and_answers(hub, env, media, tmp_path):
    res = sh(example("quickstart"), workdir(tmp_path / "w", media), env)
    assert "Downloading openbmb/MiniCPM-V-4_5-gguf: ggml-model-Q4_K_M.gguf (" in res.stderr, res.stderr
    assert fetched(hub) == ["ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"]


def test_hub_variants_think_json_and_video(hub, env, media, tmp_path):
    res = sh(example("hub-variants"), workdir(tmp_path / "w", media), env)
    # the exported MINICPMV_MODEL (Q8_0) serves the last two lines: Q4_K_M, the default, is never fetched
    assert fetched(hub) == [
        "MiniCPM-V-4.5-Q6_K.gguf",
        "ggml-model-Q8_0.gguf",
        "mmproj-MiniCPM-V-4.5-F16.gguf",
        "mmproj-model-f16.gguf",
    ]
    objects = []
    for line in res.stdout.splitlines():
        try:
            objects.append(json.loads(line))
        except ValueError:
            pass
    reports = [o for o in objects if isinstance(o, dict) and "timings" in o]
    assert len(reports) == 1 and {"answer", "thinking", "timings"} <= reports[0].keys(), res.stdout


def test_convert_from_the_hub_then_run(hub, env, media, tiny_ckpt, tmp_path):
    wd = workdir(tmp_path / "w", media)
    sh(example("convert-yourself"), wd, env)
    assert sorted(p.name for p in (wd / "minicpmv-gguf").iterdir()) == [
        "MiniCPM-V-4.5-Q4_K_M.gguf",
        "Modelfile",
        "mmproj-MiniCPM-V-4.5-F16.gguf",
    ]
    assert set(fetched(hub)) <= {p.name for p in tiny_ckpt.iterdir()}


def test_openbmb_file_names_run_as_they_are(media, tiny, tmp_path):
    wd = workdir(
        tmp_path / "w", media, **{"ggml-model-Q4_K_M.gguf": tiny["Q4_K_M"], "mmproj-model-f16.gguf": tiny["mmproj"]}
    )
    sh(example("openbmb-files"), wd, local_env(tmp_path / "home"))


@contextmanager
def serving(command: str, cwd: Path, env: dict[str, str], log: Path):
    """A `--web` line started with `--port N` appended to its words (the last --port wins; a trailing
    comment is dropped); yields the page's URL."""
    port = free_port()
    argv = shlex.split(command, comments=True) + ["--port", str(port)]
    with page_process([shutil.which(argv[0], path=env["PATH"]), *argv[1:]], port, log, cwd=cwd, env=env) as url:
        yield url


def assert_page(url: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=60) as r:
        assert r.status == 200 and b"<html" in r.read(4096).lower()


def test_web_lines_start_the_page(hub, env, media, tmp_path):
    commands = shell_commands(example("web"))
    pip = [c for c in commands if c.argv[:2] == ["pip", "install"]]
    web = [c for c in commands if c.argv[:2] == ["minicpm-run", "--web"]]
    assert len(pip) == 1 and len(pip) + len(web) == len(commands), commands
    # `pip install 'minicpmv[web]'` (not run: it installs): the extra exists and brings Gradio
    extra = re.fullmatch(r"minicpmv\[(\w+)\]", pip[0].argv[2]).group(1)
    assert any(r.startswith("gradio") and f'extra == "{extra}"' in r for r in metadata.requires("minicpmv"))
    # "open http://127.0.0.1:7860": the default address
    host, port = re.search(r"https?://([\d.]+):(\d+)", web[0].text).groups()
    defaults = {p.name: p.default for p in typer.main.get_command(run_app).params}
    assert (defaults["host"], defaults["port"]) == (host, int(port))
    wd = workdir(tmp_path / "w", media)
    for i, c in enumerate(web):
        with serving(c.text, wd, env, tmp_path / f"web{i}.log") as url:
            assert_page(url)


def test_python_api_block(media, tiny, tmp_path):
    """The block unchanged, in a folder with ./minicpmv-gguf (the tiny Q4_K_M + f16 mmproj), photo.jpg
    and clip.mp4: load, chat, thinking, streaming, multi-turn, video."""
    wd = workdir(tmp_path / "w", media, **minicpmv_gguf(tiny))
    (wd / "example.py").write_text(example("python-api"))
    res = subprocess.run(
        [sys.executable, "example.py"],
        cwd=wd,
        env=local_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "\n---\n" in res.stdout  # the thinking print ran


def hub_alternative(code: str) -> str:
    """The block with its folder load replaced by the commented lines under "# or from the Hub"."""
    lines = code.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("# or from the Hub"))
    assert lines[at - 1].startswith("model = MiniCPMV.load("), lines[at - 1]
    alt = []
    for ln in lines[at + 1 :]:
        if not ln.startswith("# "):
            break
        try:
            compile(ln[2:], "README", "exec")
        except SyntaxError:
            break
        alt.append(ln[2:])
    assert len(alt) == 2 and alt[1].startswith("model = "), f"the Hub alternative is not two commented lines: {alt}"
    return "\n".join(lines[: at - 1] + alt + lines[at + 1 + len(alt) :]) + "\n"


def test_python_api_block_from_the_hub(hub, env, media, tmp_path):
    wd = workdir(tmp_path / "w", media)
    (wd / "example.py").write_text(hub_alternative(example("python-api")))
    res = subprocess.run([sys.executable, "example.py"], cwd=wd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert fetched(hub) == ["ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"]


# ------------------------------------------------------------------------- minicpm-serve and its clients


def serve_line() -> Command:
    (command,) = shell_commands(example("serve"))
    assert command.argv[0] == "minicpm-serve", command
    return command


def test_serve_line_and_clients_name_the_default_address():
    # "# http://127.0.0.1:8080": the address minicpm-serve listens on without --host/--port
    host, port = re.search(r"https?://([\d.]+):(\d+)", serve_line().text).groups()
    defaults = {p.name: p.default for p in typer.main.get_command(serve_app).params}
    assert (defaults["host"], defaults["port"]) == (host, int(port)) and SERVE_URL == f"http://{host}:{port}"
    for name in ("serve-openai", "serve-curl", "serve-ollama"):
        assert example(name).count(SERVE_URL) == 1, name  # the one address the tests below rewrite


@pytest.fixture(scope="module")
def api(tiny, tmp_path_factory) -> Iterator[str]:
    """The README's minicpm-serve line, started as the --web lines are (`--port N` of a free port
    appended) in a folder holding ./minicpmv-gguf; yields its address in SERVE_URL's form once /health
    answers 200, and stops it after the client examples."""
    root = tmp_path_factory.mktemp("serve")
    wd = workdir(root / "w", {}, **minicpmv_gguf(tiny))
    env = local_env(root / "home")
    argv = serve_line().argv
    with serve_command(
        [shutil.which(argv[0], path=env["PATH"]), *argv[1:]], root / "serve.log", cwd=wd, env=env
    ) as url:
        assert health(url) == (200, {"status": "ok"})
        yield url.rstrip("/")


def run_python_client(name: str, url: str, media: dict[str, Path], tmp_path: Path) -> str:
    """The client example `name` with `python` in a folder with photo.jpg and clip.mp4, SERVE_URL replaced
    by `url` (nothing else); returns what it printed."""
    wd = workdir(tmp_path / "w", media)
    (wd / "example.py").write_text(example(name).replace(SERVE_URL, url))
    env = local_env(tmp_path / "home")
    res = subprocess.run([sys.executable, "example.py"], cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_serve_openai_client_block(api, media, tmp_path):
    out = run_python_client("serve-openai", api, media, tmp_path)
    # print(content, usage.prompt_tokens, timings["prompt_ms"]); the video streamed; reasoning \n---\n answer
    m = re.fullmatch(r"(.*) (\d+) (\S+)\n(.*) \n---\n (.*)\n", out, re.S)
    assert m, out
    # the photo's slices are in the prompt; prompt_ms is 0 or more (the KV cache may hold the whole prompt)
    assert int(m.group(2)) > 64 and float(m.group(3)) >= 0, out


def test_serve_curl_block(api, media, tmp_path):
    """Only python3 and curl on PATH, as for the Ollama request example; the reply is the server's JSON."""
    wd = workdir(tmp_path / "w", media)
    res = subprocess.run(
        [shutil.which("bash"), "-e", "-c", example("serve-curl").replace(SERVE_URL, api)],
        cwd=wd,
        env=curl_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reply = json.loads(res.stdout)
    assert reply["object"] == "chat.completion", reply
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert reply["usage"]["completion_tokens"] <= json.loads((wd / "request.json").read_text())["max_tokens"]
    assert reply["usage"]["prompt_tokens"] > 64, reply  # the photo's slices (encoded, or cached by the block above)


def test_serve_ollama_client_block(api, media, tmp_path):
    # print(r.message.content): the client raises on any error reply, so a clean exit is a 200 with an answer
    # (the tiny model's is random text, possibly empty)
    assert run_python_client("serve-ollama", api, media, tmp_path).endswith("\n")


# ------------------------------------------------------------------------- Ollama and llama.cpp


def ollama_commands() -> tuple[Command, Command, list[Command]]:
    commands = shell_commands(example("ollama"))
    assert [c.argv[0] for c in commands] == ["minicpm-convert"] * 2 + ["ollama"] * 3, commands
    convert, modelfile_only, ollama = commands[0], commands[1], commands[2:]
    assert modelfile_only.alternative and "--modelfile-only" in modelfile_only.argv
    return convert, modelfile_only, ollama


@pytest.fixture(scope="module")
def converted(media, tiny_ckpt, tmp_path_factory) -> Path:
    """A folder after the Ollama section's conversion line (./MiniCPM-V-4_5 is the tiny checkpoint):
    OUT holds what the llama.cpp and Ollama lines use."""
    root = tmp_path_factory.mktemp("converted")
    wd = workdir(root / "w", media, **{"MiniCPM-V-4_5": tiny_ckpt})
    sh(ollama_commands()[0].text, wd, local_env(root / "home"))
    return wd


def test_ollama_lines(converted, media, tiny, tmp_path):
    _, modelfile_only, ollama = ollama_commands()
    out = converted / "OUT"
    assert sorted(p.name for p in out.iterdir()) == [
        "MiniCPM-V-4.5-Q4_K_M.gguf",
        "Modelfile",
        "mmproj-MiniCPM-V-4.5-F16.gguf",
    ]
    # `ollama create NAME -f OUT/Modelfile`: the Modelfile parses as Ollama parses it and its FROM
    # lines (language model first) name the two files, relative to the Modelfile
    create = ollama[0].argv
    assert create[:2] == ["ollama", "create"] and create[3:] == ["-f", "OUT/Modelfile"]
    mf = ollama_modelfile_parser.validate((converted / create[4]).read_text())
    assert [(out / f).resolve() for f in mf.froms] == [
        out / "MiniCPM-V-4.5-Q4_K_M.gguf",
        out / "mmproj-MiniCPM-V-4.5-F16.gguf",
    ]
    # every `ollama run` uses the model `ollama create` made, and so does the API example
    assert {c.argv[2] for c in ollama[1:]} == {create[2]} and {c.argv[1] for c in ollama[1:]} == {"run"}
    assert f'"model": "{create[2]}"' in example("ollama-api")

    # the alternative: a Modelfile for GGUFs one already has, found by metadata (OpenBMB's names here)
    wd = workdir(
        tmp_path / "w",
        media,
        **{"OUT/ggml-model-Q4_K_M.gguf": tiny["Q4_K_M"], "OUT/mmproj-model-f16.gguf": tiny["mmproj"]},
    )
    sh(modelfile_only.text, wd, local_env(tmp_path / "home"))
    mf = ollama_modelfile_parser.validate((wd / "OUT" / "Modelfile").read_text())
    assert [Path(f).name for f in mf.froms] == ["ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"]


def llama_cpp_commands(program: str) -> list[list[str]]:
    """The words of the README block of that name, each line a call of `program`."""
    commands = [c.argv for c in shell_commands(example(program))]
    assert commands and all(argv[0] == program for argv in commands), commands
    return commands


@pytest.mark.parametrize("program", ["llama-mtmd-cli", "llama-server"])
def test_llama_cpp_lines_name_the_converted_files(converted, program):
    for argv in llama_cpp_commands(program):
        opts = dict(zip(argv, argv[1:]))
        lm, mmproj = read_gguf_info(converted / opts["-m"]), read_gguf_info(converted / opts["--mmproj"])
        assert lm.metadata[Keys.General.ARCHITECTURE] == "qwen3"
        assert mmproj.metadata[Keys.General.ARCHITECTURE] == "clip"


def mtmd_cli_sampling() -> dict[str, float]:
    argv = llama_cpp_commands("llama-mtmd-cli")[0]
    flags = {"--temp": "temperature", "--top-p": "top_p", "--top-k": "top_k", "--repeat-penalty": "repeat_penalty"}
    return {flags[a]: float(v) for a, v in zip(argv, argv[1:]) if a in flags}


def test_set_up_lines_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    for c in shell_commands(example("set-up")):
        target = c.argv[1]
        assert c.argv[0] == "make" and re.search(rf"^make {target} PYTHON=", ci, re.M), c.text
    makefile = (REPO / "Makefile").read_text()
    for target in re.findall(r"`make (\w+)`", MARKDOWN):
        assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`, the Makefile has none"


# ------------------------------------------------------------------------- request files + curl


class Receiver:
    """Records the requests curl sends (the server a README curl line talks to is not here)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers curl's "Expect: 100-continue" for a large body

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.requests.append(("POST", self.path, dict(self.headers), body))
                reply = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def only_tools(d: Path, *names: str) -> str:
    """A PATH holding only `names` (python3 is this interpreter): the example needs nothing else."""
    d.mkdir()
    for n in names:
        target = sys.executable if n == "python3" else shutil.which(n)
        assert target, f"{n} is not installed (make install installs it)"
        (d / n).symlink_to(target)
    return str(d)


def curl_env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": only_tools(tmp_path / "bin", "python3", "curl"), "HOME": str(tmp_path), "LANG": "C.UTF-8"}


def send(name: str, url: str, files: list[str], wd: Path, tmp_path: Path) -> tuple[dict, bytes, str]:
    """Run the example (its address -> a Receiver; photo.jpg -> `files`); returns the request's JSON,
    the body curl sent and the path it was sent to."""
    script = example(name)
    assert script.count(url) == 1 and script.count("python3 - photo.jpg > request.json") == 1
    script = script.replace("python3 - photo.jpg", "python3 - " + " ".join(files))
    with Receiver() as rx:
        res = subprocess.run(
            [shutil.which("bash"), "-e", "-c", script.replace(url, rx.url)],
            cwd=wd,
            env=curl_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(rx.requests) == 1, rx.requests
    method, path, headers, body = rx.requests[0]
    written = (wd / "request.json").read_bytes()
    assert body == written, "curl -d @request.json did not send the file as it is"  # -d drops CR/LF
    return json.loads(written), body, path


@pytest.mark.parametrize("files", [["photo.jpg"], ["photo.jpg", "puzzle.png"]], ids=["as-written", "two-images"])
def test_ollama_request_file(media, files, tmp_path):
    wd = workdir(tmp_path / "w", media)
    req, body, path = send("ollama-api", OLLAMA_URL, files, wd, tmp_path)
    assert path == "/api/chat"
    images = check_ollama_chat(req)
    assert images == [media[f].read_bytes() for f in files]
    assert [m["role"] for m in req["messages"]] == ["user"] and req["think"] is False
    # the case the issue is about: the photo's base64 alone exceeds one command-line argument
    assert len(req["messages"][0]["images"][0]) > ARG_MAX_STRLEN


@pytest.mark.parametrize("files", [["photo.jpg"], ["photo.jpg", "puzzle.png"]], ids=["as-written", "two-images"])
def test_llama_server_request_file(media, files, tmp_path):
    wd = workdir(tmp_path / "w", media)
    req, body, path = send("llama-server-api", LLAMA_SERVER_URL, files, wd, tmp_path)
    assert path == "/v1/chat/completions"
    images = check_llama_server_chat(req)
    assert images == [
        ({".jpg": "image/jpeg", ".png": "image/png"}[Path(f).suffix], media[f].read_bytes()) for f in files
    ]
    (msg,) = req["messages"]
    assert msg["role"] == "user" and [p["type"] for p in msg["content"]] == ["image_url"] * len(files) + ["text"]
    assert req["chat_template_kwargs"] == {"enable_thinking": True}
    # llama.cpp's MiniCPM-V sampling, as on the llama-mtmd-cli line
    assert {k: req[k] for k in mtmd_cli_sampling()} == mtmd_cli_sampling()
    assert len(body) > ARG_MAX_STRLEN


@pytest.mark.parametrize(
    "mistake,request_",
    [
        (
            "a data: URL in Ollama's images",
            {"model": "m", "messages": [{"role": "user", "content": "q", "images": ["data:image/jpeg;base64,/9j/"]}]},
        ),
        (
            "base64 with line breaks",
            {"model": "m", "messages": [{"role": "user", "content": "q", "images": ["/9j/" * 20 + "\n" + "/9j/"]}]},
        ),
        ("a misspelt field", {"model": "m", "thinking": False, "messages": [{"role": "user", "content": "q"}]}),
        ("an unknown role", {"model": "m", "messages": [{"role": "human", "content": "q"}]}),
    ],
)
def test_ollama_check_rejects(mistake, request_):
    with pytest.raises(AssertionError):
        check_ollama_chat(request_)


@pytest.mark.parametrize(
    "mistake,request_",
    [
        (
            "plain base64 as the url",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/9j/"}}]}]},
        ),
        (
            "enable_thinking as a string",
            {"chat_template_kwargs": {"enable_thinking": "false"}, "messages": [{"role": "user", "content": "q"}]},
        ),
        ("an image part without image_url", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
        (
            "a sampling field under another name",
            {"repetition_penalty": 1.05, "messages": [{"role": "user", "content": "q"}]},
        ),
    ],
)
def test_llama_server_check_rejects(mistake, request_):
    with pytest.raises(AssertionError):
        check_llama_server_chat(request_)


def test_strict_base64_round_trip():
    data = bytes(range(256)) * 3 + b"x"
    assert strict_b64decode(base64.b64encode(data).decode(), "t") == data


# ------------------------------------------------------------------------- minicpm-imatrix


def test_imatrix_lines_with_the_calibration_example(media, tiny, tiny_ckpt, tmp_path):
    first, second, convert = shell_commands(example("imatrix"))
    assert second.alternative and [c.argv[0] for c in (first, second, convert)] == [
        "minicpm-imatrix",
        "minicpm-imatrix",
        "minicpm-convert",
    ]
    files = {
        "photos/receipt.jpg": media["photo.jpg"],
        "photos/street.mp4": media["clip.mp4"],
        "clips/street.mp4": media["clip.mp4"],
        "f16-gguf/MiniCPM-V-4.5-F16.gguf": tiny["F16"],
        "f16-gguf/mmproj-MiniCPM-V-4.5-F16.gguf": tiny["mmproj"],
        "MiniCPM-V-4.5-F16.gguf": tiny["F16"],
        "mmproj-MiniCPM-V-4.5-F16.gguf": tiny["mmproj"],
        "MiniCPM-V-4_5": tiny_ckpt,
    }
    for i, alternative in enumerate((first, second)):
        wd = workdir(tmp_path / f"w{i}", media, **files)
        (wd / "calib.jsonl").write_text(example("imatrix-calibration"))  # the JSON-lines example as it is
        sh(f"{alternative.text}\n{convert.text}", wd, local_env(tmp_path / "home"))
        q = convert.argv[convert.argv.index("--quant") + 1]
        info = read_gguf_info(wd / "OUT" / f"MiniCPM-V-4.5-{q}.gguf")
        assert info.metadata[Keys.General.ARCHITECTURE] == "qwen3"


# ------------------------------------------------------------------------- prose commands, --help


def test_printing_commands(tmp_path):
    env = local_env(tmp_path / "home")
    report = sh(INLINE_COMMANDS["version"], tmp_path, env).stdout
    assert "llama" in report.lower()
    assert sh(INLINE_COMMANDS["list-cached"], tmp_path, env).stdout.startswith("Hugging Face cache: ")
    for prog in ("minicpm-run", "minicpm-convert", "minicpm-imatrix"):
        assert "Usage: " in sh(f"{prog} --help", tmp_path, env).stdout


def test_synthetic_checkpoint_line(tmp_path):
    sh(INLINE_COMMANDS["synthetic"].replace("tiny|medium|full", "tiny"), tmp_path, local_env(tmp_path / "home"))
    assert (tmp_path / "OUT" / "config.json").is_file()


def test_which_one_to_use_table_commands(converted, tmp_path):
    env = local_env(tmp_path / "home")
    sh(INLINE_COMMANDS["table-video"], converted, env)
    sh(INLINE_COMMANDS["low-memory"], converted, env)  # the Memory section's
    with serving(INLINE_COMMANDS["table-web"], converted, env, tmp_path / "web.log") as url:
        assert_page(url)


@pytest.mark.parametrize("prog", ["minicpm-convert", "minicpm-imatrix"])
def test_option_tables_name_real_options(prog, tmp_path):
    lines = MARKDOWN.split(f"\n## {prog}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| option |"))
    first_cells = [ln.split("|")[1] for ln in itertools.takewhile(lambda ln: ln.startswith("|"), lines[header + 2 :])]
    named = {o for cell in first_cells for o in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", cell)}
    assert len(named) >= 5, first_cells
    help_text = sh(f"{prog} --help", tmp_path, local_env(tmp_path / "home")).stdout
    missing = sorted(o for o in named if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", help_text))
    assert not missing, f"README's {prog} table names options --help does not know: {missing}"
