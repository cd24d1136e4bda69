"""`minicpm-run` / `minicpm-convert` fetching from the Hugging Face Hub (issue 13), end to end.

The real huggingface_hub client talks to a stand-in for the Hub on 127.0.0.1 (tests/hub_standin.py)
through HF_ENDPOINT; HF_HOME is a temporary folder, every other host is routed to a dead proxy, so the
tests never reach the network or the user's cache. The repos hold synthetic files in OpenBMB's layout
(ggml-model-<QUANT>.gguf + mmproj-model-f16.gguf) and our own names. Oracle: the answer equals the
one from the same files given as local paths (greedy decoding), and cached files equal the served
bytes (sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .hub_standin import HubStandIn, Repo, etag

GGUF_REPO = "openbmb/MiniCPM-V-4_5-gguf"
CKPT_REPO = "openbmb/MiniCPM-V-4_5"
RUN_ARGS = ("--json", "-n", "4", "--greedy", "-t", "1")
INFO_PREFIXES = ("Downloading ", "Cached in ")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def medium_files(tmp_path_factory) -> dict[str, Path]:
    """The 'medium' synthetic scale: its GGUFs exceed huggingface_hub's 10 MiB download chunk, so a
    connection cut in the middle leaves bytes on disk to resume from."""
    from minicpmv.convert.pipeline import convert
    from minicpmv.convert.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("medium")
    ckpt = make_checkpoint(root / "ckpt", "medium")
    q4 = convert(ckpt, root / "q4", quant_type="Q4_K_M", mmproj_type="f16", progress=False)
    q8 = convert(ckpt, root / "q8", quant_type="Q8_0", write_mmproj=False, progress=False)
    return {"Q4_K_M": q4.lm_path, "Q8_0": q8.lm_path, "mmproj": q4.mmproj_path}


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("pic") / "picture.png"
    Image.new("RGB", (80, 60), (30, 140, 200)).save(p)
    return p


def _repos(medium_files, tiny_ckpt) -> dict[str, Repo]:
    m = {k: v.read_bytes() for k, v in medium_files.items()}
    ckpt = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir() if p.is_file()}
    return {
        GGUF_REPO: Repo(
            {
                "ggml-model-Q4_K_M.gguf": m["Q4_K_M"],
                "ggml-model-Q8_0.gguf": m["Q8_0"],
                "mmproj-model-f16.gguf": m["mmproj"],
                "README.md": b"# GGUF\n",
                ".gitattributes": b"*.gguf filter=lfs\n",
            }
        ),
        # our converter's names, pushed as they are
        "someone/minicpmv-ours": Repo(
            {"MiniCPM-V-4.5-Q4_K_M.gguf": m["Q4_K_M"], "mmproj-MiniCPM-V-4.5-F16.gguf": m["mmproj"]}
        ),
        # a checkpoint with what conversion does not read next to it
        CKPT_REPO: Repo(
            {
                **ckpt,
                "pytorch_model.bin": b"\0" * 4096,
                "assets/demo.png": b"\x89PNG",
                "modeling_minicpmv.py": b"# remote code\n",
            }
        ),
        "gated/minicpmv-gguf": Repo(
            {"ggml-model-Q4_K_M.gguf": m["Q4_K_M"], "mmproj-model-f16.gguf": m["mmproj"]}, gated=True
        ),
        # its listing claims a language model larger than any disk
        "huge/minicpmv-gguf": Repo(
            {"ggml-model-Q4_K_M.gguf": m["Q4_K_M"], "mmproj-model-f16.gguf": m["mmproj"]},
            listed_sizes={"ggml-model-Q4_K_M.gguf": 10**16},
        ),
    }


@pytest.fixture
def hub(medium_files, tiny_ckpt):
    s = HubStandIn(_repos(medium_files, tiny_ckpt)).start()
    yield s
    s.stop()
    assert not s.unexpected, f"requests outside the Hub API subset: {s.unexpected}"


def hub_env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A clean environment: no HF_* / proxy / MINICPMV_* of the user's; the cache under `home`;
    any host but 127.0.0.1 goes to a proxy that does not exist."""
    drop = ("HF_", "HUGGING_FACE", "MINICPMV_", "TRANSFORMERS_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(drop) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env.update(
        HF_HOME=str(home / "hf"),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        ALL_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        **extra,
    )
    return env


def run(env: dict[str, str], *args: str, module: str = "run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"minicpmv.cli.{module}", *args], capture_output=True, text=True, env=env, timeout=300
    )


def answer(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["answer"]


def error_line(res: subprocess.CompletedProcess, *needles: str, prog: str = "minicpm-run") -> str:
    """Exit 2 and exactly one error line (info lines before it are allowed); returns it."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith(INFO_PREFIXES)]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), res.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(home: Path, repo: str) -> Path:
    d = home / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    return d / "snapshots" / (d / "refs" / "main").read_text()


@pytest.fixture(scope="module")
def reference_answer(medium_files, picture, tmp_path_factory) -> dict[str, str]:
    """Answers from the same GGUFs given as local paths, per language-model quant."""
    env = hub_env(tmp_path_factory.mktemp("ref"), "http://127.0.0.1:9")
    return {
        q: answer(
            run(env, "-m", str(medium_files[q]), "--mmproj", str(medium_files["mmproj"]), str(picture), "q", *RUN_ARGS)
        )
        for q in ("Q4_K_M", "Q8_0")
    }


def test_first_run_downloads_later_runs_need_no_network(hub, picture, tmp_path, medium_files, reference_answer):
    env = hub_env(tmp_path, hub.endpoint)
    res = run(env, str(picture), "q", *RUN_ARGS)
    assert answer(res) == reference_answer["Q4_K_M"]
    info = res.stderr.splitlines()
    assert info[0].startswith(f"Downloading {GGUF_REPO}: ggml-model-Q4_K_M.gguf (")
    assert "mmproj-model-f16.gguf (" in info[0] and "ggml-model-Q8_0" not in info[0]
    assert info[1].startswith("Cached in ") and str(snapshot(tmp_path, GGUF_REPO)) in info[1]
    # only the two files were fetched, each once, whole
    gets = hub.file_gets()
    assert sorted(r.path.rsplit("/", 1)[1] for r in gets) == ["ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"]
    assert all(r.range is None for r in gets)
    snap = snapshot(tmp_path, GGUF_REPO)
    assert sha256(snap / "ggml-model-Q4_K_M.gguf") == sha256(medium_files["Q4_K_M"])
    assert sha256(snap / "mmproj-model-f16.gguf") == sha256(medium_files["mmproj"])

    n = len(hub.log)
    res = run(env, str(picture), "q", *RUN_ARGS)  # cached: no request at all, nothing printed
    assert answer(res) == reference_answer["Q4_K_M"] and res.stderr == ""
    res = run(env, "--list-cached")
    assert res.returncode == 0, res.stderr
    listed = [ln for ln in res.stdout.splitlines() if ln.startswith(GGUF_REPO)]
    assert len(listed) == 1 and "Q4_K_M" in listed[0] and "mmproj F16" in listed[0], res.stdout
    assert len(hub.log) == n

    hub.stop()  # the network is down: still answers
    assert answer(run(env, str(picture), "q", *RUN_ARGS)) == reference_answer["Q4_K_M"]
    offline = dict(env, HF_HUB_OFFLINE="1")
    assert answer(run(offline, str(picture), "q", *RUN_ARGS)) == reference_answer["Q4_K_M"]


def test_refresh_asks_the_hub_but_downloads_nothing_unchanged(hub, picture, tmp_path, reference_answer):
    env = hub_env(tmp_path, hub.endpoint)
    answer(run(env, str(picture), "q", *RUN_ARGS))
    before = len(hub.log)
    res = run(env, "--refresh", str(picture), "q", *RUN_ARGS)
    assert answer(res) == reference_answer["Q4_K_M"]
    asked = [(r.method, r.path.rsplit("/", 1)[1]) for r in hub.log[before:]]
    assert asked[0] == ("GET", "main") and ("HEAD", "ggml-model-Q4_K_M.gguf") in asked, asked
    assert all(m == "HEAD" for m, _ in asked[1:]) and "Downloading" not in res.stderr, asked


def test_interrupted_download_resumes_on_the_next_run(hub, picture, tmp_path, medium_files, reference_answer):
    name, data = "ggml-model-Q8_0.gguf", medium_files["Q8_0"].read_bytes()
    hub.cut[name] = len(data) // 2
    env = hub_env(tmp_path, hub.endpoint)
    args = ("--hf", f"{GGUF_REPO}:Q8_0", str(picture), "q", *RUN_ARGS)
    error_line(run(env, *args), name, "interrupted", "run the same command again to resume")
    part = tmp_path / "hf/hub/models--openbmb--MiniCPM-V-4_5-gguf/blobs" / f"{etag(name, data)}.incomplete"
    kept = part.stat().st_size
    assert 0 < kept <= len(data) // 2
    assert part.read_bytes() == data[:kept]

    hub.cut.clear()
    before = len(hub.log)
    res = run(env, *args)
    assert answer(res) == reference_answer["Q8_0"]
    assert "resuming" in res.stderr.splitlines()[0]
    gets = [r for r in hub.log[before:] if r.method == "GET" and r.path.endswith(name)]
    assert [r.range for r in gets] == [f"bytes={kept}-"]  # only the missing bytes were asked for
    assert sha256(snapshot(tmp_path, GGUF_REPO) / name) == hashlib.sha256(data).hexdigest()
    assert not part.exists()


def test_our_file_names_lower_case_quant_and_env_variable(hub, picture, tmp_path, reference_answer):
    env = hub_env(tmp_path, hub.endpoint)
    assert (
        answer(run(env, "--hf", "someone/minicpmv-ours:q4_k_m", str(picture), "q", *RUN_ARGS))
        == reference_answer["Q4_K_M"]
    )
    n = len(hub.log)
    env_var = dict(env, MINICPMV_MODEL="someone/minicpmv-ours")  # cached now: no request
    assert answer(run(env_var, str(picture), "q", *RUN_ARGS)) == reference_answer["Q4_K_M"]
    assert len(hub.log) == n
    # --hf wins over the variable (which names a repo that does not exist); a folder in it works too
    assert (
        answer(
            run(
                dict(env, MINICPMV_MODEL="nobody/nothing"),
                "--hf",
                "someone/minicpmv-ours",
                str(picture),
                "q",
                *RUN_ARGS,
            )
        )
        == reference_answer["Q4_K_M"]
    )
    assert len(hub.log) == n
    folder = snapshot(tmp_path, "someone/minicpmv-ours")
    assert (
        answer(run(dict(env, MINICPMV_MODEL=str(folder)), str(picture), "q", *RUN_ARGS)) == reference_answer["Q4_K_M"]
    )


def test_repo_not_found(hub, picture, tmp_path):
    error_line(
        run(hub_env(tmp_path, hub.endpoint), "--hf", "nobody/nothing", str(picture), "q"),
        "nobody/nothing",
        "not found",
        "hf auth login",
    )


def test_quant_not_in_repo_lists_what_it_has(hub, picture, tmp_path):
    line = error_line(
        run(hub_env(tmp_path, hub.endpoint), "--hf", f"{GGUF_REPO}:Q5_K_M", str(picture), "q"), GGUF_REPO, "Q5_K_M"
    )
    assert line.endswith("available: Q4_K_M, Q8_0"), line
    assert not hub.file_gets()


def test_gated_repo_says_how_to_log_in(hub, picture, tmp_path):
    error_line(
        run(hub_env(tmp_path, hub.endpoint), "--hf", "gated/minicpmv-gguf", str(picture), "q"),
        "gated/minicpmv-gguf",
        "gated",
        "hf auth login",
        "HF_TOKEN",
    )


def test_not_enough_disk_space_is_refused_before_downloading(hub, picture, tmp_path):
    error_line(
        run(hub_env(tmp_path, hub.endpoint), "--hf", "huge/minicpmv-gguf", str(picture), "q"),
        "not enough free disk space",
        "huge/minicpmv-gguf",
    )
    assert not hub.file_gets()


def test_offline_with_empty_cache_names_the_download_command(hub, picture, tmp_path):
    env = hub_env(tmp_path, hub.endpoint, HF_HUB_OFFLINE="1")
    error_line(run(env, str(picture), "q"), "HF_HUB_OFFLINE", f'minicpm-run --hf {GGUF_REPO}:Q4_K_M IMAGE "QUESTION"')
    assert hub.log == []


def test_network_down_with_empty_cache(hub, picture, tmp_path):
    hub.stop()
    error_line(run(hub_env(tmp_path, hub.endpoint), str(picture), "q"), "cannot reach the Hub", GGUF_REPO)


def test_convert_a_repo_id_downloads_only_what_conversion_reads(hub, tmp_path, tiny_lm_gguf, tiny_mmproj_gguf):
    env = hub_env(tmp_path, hub.endpoint)
    res = run(env, CKPT_REPO, "-o", str(tmp_path / "out"), "--quiet", module="convert")
    assert res.returncode == 0, res.stderr
    got = sorted(r.path.rsplit("/resolve/main/", 1)[1] for r in hub.file_gets())
    assert got == sorted(n for n in hub.repos[CKPT_REPO].files if n.endswith((".json", ".safetensors", ".txt"))), got
    lm, mm = (Path(p) for p in res.stdout.split())
    assert lm.read_bytes() == tiny_lm_gguf("Q4_K_M").read_bytes()
    assert mm.read_bytes() == tiny_mmproj_gguf("f16").read_bytes()

    hub.stop()  # converting again needs no network
    res = run(env, CKPT_REPO, "-o", str(tmp_path / "again"), "--quiet", module="convert")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "again" / lm.name).read_bytes() == lm.read_bytes()


def test_convert_unknown_repo_or_missing_folder(hub, tmp_path):
    res = run(
        hub_env(tmp_path, hub.endpoint), "nobody/nothing", "-o", str(tmp_path / "out"), "--quiet", module="convert"
    )
    error_line(res, "nobody/nothing: no such folder, and repository not found", prog="minicpm-convert")
    assert not (tmp_path / "out").exists()


def test_bare_command_shows_the_help_and_fetches_nothing(hub, tmp_path):
    res = run(hub_env(tmp_path, hub.endpoint))
    assert "Usage" in res.stdout + res.stderr and "--hf" in res.stdout + res.stderr
    assert hub.log == [] and not (tmp_path / "hf").exists()
