"""§4c Serving over HTTP: `minicpm-serve` vs llama-cpp-python's own server (issue 27).

Both servers run as subprocesses on free loopback ports, each loaded once, and get the same requests
from the official `openai` client (streaming, greedy): a 1344x1344 image question (time to first
token), a follow-up on the same photo with the whole history resent (as an OpenAI client does),
text decode speed, resident memory after load and after the first image, and the 60 s video through
`/v1/chat/completions` (ours only: the peer has no video part). The in-process figures the server
is held to (decode tokens/s of `chat()`, RSS after the load minicpm-run makes) come from a second
worker that starts after the servers have stopped, so the two never share the CPU.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.util
import io
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..common import GB, BenchError, Skip, median, stop_process
from ..measure import QUESTION, Runs
from ..report import fmt_list, row
from ..session import Session
from . import serve_video_peer

FOLLOW_UP = "Which of these shapes is the largest, and where is it in the picture?"
SECOND_FOLLOW_UP = "What colour is it?"
# a user reads the answer before asking again: the time the server has to decode the answer into the KV
# cache as the follow-up will resend it (runtime/next_turn.py); a 32-token answer takes ~2-3 s of it
READ_PAUSE_S = 10.0
STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle."
VIDEO_QUESTION = "Describe the video."
PACKING = 3
# the 60 s clip samples 300 frames at fps 5, more than the server's default --max-video-frames (256)
MAX_VIDEO_FRAMES = 512
# one conversation at a time, as minicpm-run and the peer (one slot): the context grows with the conversation
# and the KV cache is made at the first prefill; the default (issue 30) is up to 4 slots of 4096 positions
OURS_FLAGS = ["--parallel", "1", "--max-video-frames", str(MAX_VIDEO_FRAMES)]
PEER_CHAT_FORMAT = "minicpm-v-2.6"
PEER_CTX = 4096
# what `pip install llama-cpp-python[server]` adds on top of FastAPI and uvicorn (import names)
PEER_MODULES = ("sse_starlette", "starlette_context", "pydantic_settings", "yaml")
# llama-cpp-python's server has no setting for llama_model_params.use_extra_bufts: this runs its main()
# with the default model parameters changed (its Llama() reads them when it loads the model)
PEER_NO_EXTRA_BUFTS = """
import llama_cpp.llama_cpp as c
defaults = c.llama_model_default_params
def no_extra_bufts():
    p = defaults()
    p.use_extra_bufts = False
    return p
c.llama_model_default_params = no_extra_bufts
from llama_cpp.server.__main__ import main
main()
"""


def run(bench: Session) -> dict:
    s = bench.scale
    groups = max(1, s.video_subset // PACKING)
    common = {
        "lm": str(bench.lm),
        "mmproj": str(bench.mmproj),
        "threads": bench.threads,
        "n_gen": s.n_gen,
        "prompts": [f"Run {r}: {STORY}" for r in range(bench.e2e_runs)],
        "video": str(bench.video()),
        "video_groups": groups,
    }
    m = bench.worker(
        "serve",
        {
            **common,
            "image": str(bench.image()),
            "runs": bench.e2e_runs,
            "e2e_gen": s.e2e_gen,
            # the whole clip is ~1,400 s of vision and prefill at full size on 2 cores (§4b): only smaller scales
            "whole_video": s.name != "full",
            "budget_s": bench.runs_budget("serve"),
        },
    )
    ip = bench.worker("serve_inproc", common)
    r, q = m.result, ip.result
    # llama.cpp's figure for the video: llama-server on the same clip, as many frames as ours' measured request
    lbin, lwhy = serve_video_peer.binary(bench)
    lv: dict | None = None
    if lbin is not None:
        try:
            lv = bench.worker(
                "serve_video_peer", common | {"binary": str(lbin), "frames": q["video_capped_frames"]}
            ).result
        except (BenchError, Skip) as e:
            lwhy = f"llama-server did not answer: {str(e).splitlines()[0]}"
    peer_ok = bool(r["peer_ttft_s"])
    rows, notes = [], []

    # -- the image question and its follow-up
    o, p = r["ours_ttft_s"], r["peer_ttft_s"]
    pairs = [x / y for x, y in zip(o, p) if x and y]
    ratio = median(pairs) if pairs else None
    rows.append(
        row(
            "time to first token, 1344x1344 image question over HTTP",
            median(o),
            median(p) if p else None,
            unit="s",
            ratio=ratio,
            target="<= 0.6x",
            met=None if ratio is None else ratio <= 0.6,
        )
    )
    n_gen = median(r["ours_n_gen"])
    rows.append(
        row(
            f"total time, same request ({n_gen:.0f} tokens generated)",
            median(r["ours_total_s"]),
            median(r["peer_total_s"]) if peer_ok else None,
            unit="s",
        )
    )
    ours_frac = [f / t for f, t in zip(r["ours_follow_ttft_s"], o)]
    peer_frac = r["peer_follow_ttft_s"][0] / p[0] if r["peer_follow_ttft_s"] and p else None
    rows.append(
        row(
            f"time to first token, follow-up on the same photo, asked {READ_PAUSE_S:.0f} s after the answer "
            "(whole history resent)",
            median(r["ours_follow_ttft_s"]),
            r["peer_follow_ttft_s"][0] if r["peer_follow_ttft_s"] else None,
            unit="s",
        )
    )
    frac = median(ours_frac)
    rows.append(
        row(
            "follow-up time to first token / the same side's first request (ratio column: ours)",
            frac,
            peer_frac,
            unit="x",
            ratio=frac,
            target="<= 0.05x",
            # the summary line needs the peer's figure beside ours; without it the verdict is a note
            met=(frac <= 0.05) if peer_frac is not None else None,
        )
    )

    again = r.get("ours_again_ttft_s") or []
    if again:
        rows.append(
            row(
                "second follow-up sent as soon as the first one's answer ended / first request (ours)",
                median([x / t for x, t in zip(again, o)]),
                None,
                unit="x",
            )
        )

    # -- decode through the server vs in process
    srv_tps, ip_tps = r["ours_decode_tps"], q["decode_tps"]
    d_ratio = median(srv_tps) / median(ip_tps) if median(ip_tps) else None
    rows.append(
        row(
            "decode tokens/s through the server (llama.cpp column: in-process chat())",
            median(srv_tps),
            median(ip_tps),
            unit="tok/s",
            ratio=d_ratio,
            better="higher",
            target=">= 0.97x",
            met=None if d_ratio is None else d_ratio >= 0.97,
        )
    )

    # -- memory
    o_load, ip_load = r["ours_rss_load"]["VmRSS"], q["rss_load"]["VmRSS"]
    rss_ratio = o_load / ip_load
    rows.append(
        row(
            "RSS after load, server process (llama.cpp column: in-process MiniCPMV.load as minicpm-run loads)",
            o_load,
            ip_load,
            unit="GB",
            ratio=rss_ratio,
            target="within 5%",
            met=abs(rss_ratio - 1) <= 0.05,
        )
    )
    p_first = (r.get("peer_rss_first") or {}).get("VmRSS")
    rows.append(
        row(
            "RSS after the first 1344x1344 request (the warm-up before it), server processes",
            r["ours_rss_first"]["VmRSS"],
            p_first,
            unit="GB",
        )
    )

    # -- video (ours only)
    cap = r["video_capped"]
    cap_tokens = (cap["usage"] or {}).get("prompt_tokens")
    whole_tokens = q["video_whole_tokens"]
    w = r.get("video_whole")
    w_tokens = (w["usage"] or {}).get("prompt_tokens") if w else None
    est = _whole_video_estimate(cap, q)
    l_tokens = (lv["reply"].get("usage") or {}).get("prompt_tokens") if lv else None
    l_whole = serve_video_peer.whole_clip(lv, q["video_whole_frames"]) if lv else (None, None)
    o_whole = w_tokens if w_tokens is not None else whole_tokens
    rows += [
        row(
            f"video prompt tokens, whole 60 s clip, packing {PACKING} (llama.cpp: llama-server, each frame an image, "
            "scaled by frames)",
            o_whole,
            l_whole[0],
            unit="tok",
            ratio=o_whole / l_whole[0] if o_whole and l_whole[0] else None,
            note="measured: usage.prompt_tokens"
            if w_tokens is not None
            else "counted in process, as the server builds it",
        ),
        row(
            f"video time to first token, 60 s clip sampled to {q['video_capped_groups']} groups "
            f"({q['video_capped_frames']} frames, max_frames {groups}; llama.cpp: llama-server, the same frames "
            "as images)",
            cap["ttft_s"],
            lv["reply"]["ttft_s"] if lv else None,
            unit="s",
            ratio=cap["ttft_s"] / lv["reply"]["ttft_s"] if lv else None,
            note="measured",
        ),
        row(
            "video prompt tokens, same request",
            cap_tokens,
            l_tokens,
            unit="tok",
            ratio=cap_tokens / l_tokens if cap_tokens and l_tokens else None,
            note="usage.prompt_tokens",
        ),
        row(
            "video time to first token, whole 60 s clip",
            est,
            l_whole[1],
            unit="s",
            ratio=est / l_whole[1] if est and l_whole[1] else None,
            note=f"estimated from the {q['video_capped_groups']}-group request (llama.cpp: scaled by frames)",
        ),
    ]
    if w:
        rows.append(row("video time to first token, whole 60 s clip", w["ttft_s"], None, unit="s", note="measured"))

    # -- notes
    size_mb = r["image_png_bytes"] / 2**20
    notes += [
        f"Both servers are subprocesses of the measuring worker on loopback ports, loaded once, same Q4_K_M + f16 "
        f"mmproj, {bench.threads} threads: ours `python -m minicpmv.cli.serve --model LM --mmproj MMPROJ -t "
        f"{bench.threads} --port P {' '.join(OURS_FLAGS)}` (one conversation at a time, as minicpm-run and the "
        "peer: the context sized per turn and grown with the conversation; its default since issue 30 is up to 4 "
        "slots of 4096 positions each, whose KV cache is made at load, and a slot refuses a longer prompt, such "
        "as the whole 60 s clip); "
        f"the peer `python -m llama_cpp.server --model LM --clip_model_path MMPROJ --chat_format {PEER_CHAT_FORMAT} "
        f"--n_ctx {PEER_CTX} --n_threads {bench.threads} --n_threads_batch {bench.threads}` (llama-cpp-python "
        f"{r.get('peer_version')}, its other settings at their defaults).",
        f"Requests: the official openai client {r.get('openai_version')}, streaming, temperature 0, max_tokens "
        f"{s.e2e_gen} for the image questions; the 1344x1344 picture as a PNG data URI ({size_mb:.1f} MB), one "
        "pixel changed per run so no side reuses an encoding from an earlier run; time to first token = the "
        "request sent -> the first content delta received (upload, image decoding, preprocessing, vision, "
        "prefill, the first token); the side that goes first alternates from run to run.",
        f"{len(o)} runs after a 448x448 warm-up request on each side; per-run TTFT: ours {fmt_list(o)} s"
        + (f", peer {fmt_list(p)} s" if p else "")
        + f"; ours, first request: prompt tokens {r['ours_first_usage'][0].get('prompt_tokens')}, "
        f"{_timings_line(r['ours_first_timings'][0])}.",
        "Follow-up: the first request's messages + the assistant's answer + a new question, resent whole, "
        f"{READ_PAUSE_S:.0f} s after the answer ended (a user reading it). Ours per run (follow-up / first TTFT): "
        f"{fmt_list(ours_frac)}; ours' follow-up, run 1: "
        f"{r['ours_follow_usage'][0].get('prompt_tokens')} prompt positions, "
        f"{_timings_line(r['ours_follow_timings'][0])}. The reference's template renders a past answer without "
        "the empty thinking block the first prompt ends with, so the cache the answer was generated into "
        "differs from the follow-up's prompt from the answer on; while no request waits, the server decodes "
        "the answer as the follow-up will resend it (runtime/next_turn.py), and the follow-up decodes only its "
        "own question. "
        + (
            f"A second follow-up sent the moment the first follow-up's answer ended (no time for that) per run: "
            f"{fmt_list([x / t for x, t in zip(again, o)])} of the first TTFT; run 1: "
            f"{_timings_line(r['ours_again_timings'][0])} (the answer decoded again as the client sent it back: "
            "a random-weight model's answer can re-tokenize into more tokens than were generated). "
            if again
            else ""
        )
        + (
            f"The peer's follow-up was measured once (run 1): {peer_frac:.3g}x its first request: its "
            f"{PEER_CHAT_FORMAT} chat handler clears the KV cache and evaluates the whole conversation, image "
            "included, on every request."
            if peer_frac is not None
            else ""
        ),
        f"Decode: a text request asking for a long story, max_tokens {s.n_gen}, {len(srv_tps)} runs, ours only; "
        "tokens/s = completion tokens / (first content delta -> the finish chunk) through the server (the peer "
        "stopped by then), and "
        "decode_tokens / (first non-empty piece -> stream exhausted) for `chat(stream=True)` with the options "
        "the server passes (greedy), in a fresh worker after the servers stopped. Per run: server "
        f"{fmt_list(srv_tps)}, in process {fmt_list(ip_tps)} tok/s (tokens {r['ours_decode_n']} / "
        f"{q['decode_n']}); the runtime's own decode counter: server {fmt_list(r['ours_decode_counter_tps'])}, "
        f"in process {fmt_list(q['decode_counter_tps'])} tok/s (where the two counters agree, the difference above "
        "is the delivery). The server decodes after the image requests above; before the runtime kept its "
        "llama.cpp and torch work on one thread that cost it 7-11% on this page's Intel Xeon (libgomp's throttled "
        "barriers, docs/architecture.md §3 'One OpenMP thread'). Greedy "
        "answers of the same prompt can still differ in length between the two (the server's KV cache holds "
        "other requests' prefixes, and a random-weight model's logits are close enough for batching to flip "
        "the argmax).",
        "RSS (VmRSS of /proc/PID/status, GB): ours after load "
        f"{_rss_line(r['ours_rss_load'])}, after the first image {_rss_line(r['ours_rss_first'])}, peak "
        f"{r['ours_rss_end']['VmHWM']:.2f}; in-process MiniCPMV.load (session.model.open_model, as minicpm-run) "
        f"after load {_rss_line(q['rss_load'])}"
        + (
            f"; the peer after load {_rss_line(r['peer_rss_load'])} (its mtmd context, the vision weights, is "
            f"made on its first image request, the warm-up), after the first image {_rss_line(r['peer_rss_first'])}, "
            "peak "
            f"{r['peer_rss_end']['VmHWM']:.2f}"
            if r.get("peer_rss_end")
            else ""
        )
        + ". The server process also holds FastAPI and uvicorn (~20 MB).",
        f"Video: the 60 s clip (10 fps, 448x252, {r['video_bytes'] / 2**20:.1f} MB) as a `video_url` data URI with "
        f"`mm_processor_kwargs` {{packing: {PACKING}}} (+ max_frames {groups} for the measured request), "
        f"max_tokens 4; sampled at fps 5 the whole clip is {q['video_whole_frames']} frames in "
        f"{q['video_whole_groups']} groups, above the server's default --max-video-frames 256, so it runs with "
        f"--max-video-frames {MAX_VIDEO_FRAMES} (the clip is far below --max-upload-mb 64 and --max-body-mb 100, "
        "and --max-video-seconds 600). max_frames spreads the sampled frames over the whole minute, so the "
        "measured request decodes the whole upload but encodes only those groups. "
        f"The whole clip's prompt tokens are counted in process with the server's own media loader and prompt "
        f"builder (the same count for the capped request: {q['video_capped_tokens']}, the server said "
        f"{cap_tokens}); the whole-clip TTFT is estimated from the measured request's timings (vision scaled by "
        "groups, prefill by prompt tokens, the rest as measured: a lower bound, attention grows with the "
        f"context); measured request: {_timings_line(cap['timings'])}.",
        "llama.cpp's video figure: the peer (llama-cpp-python's server) has no video content part (its chat "
        "handlers take image_url only); llama-server of the pinned llama.cpp (llama-cpp-python 0.3.36's vendor "
        "tree) does: tools/server/server-common.cpp accepts `input_video` and `video_url` parts, sampled at "
        "--video-fps by mtmd's video helper with ffmpeg and ffprobe subprocesses. "
        + (
            f"It ran (the build of §4d, -np 1, -c {serve_video_peer.CTX}, --video-fps {lv['fps']:.3g}: "
            f"{lv['frames']} frames over the {lv['seconds']:.0f} s clip, the same request as ours': `video_url` "
            f"data URI, max_tokens 4, after a text warm-up); its MiniCPM-V encoder has no temporal input, so each "
            f"frame is an image of its own; {_peer_prompt(lv['reply'])}; whole clip: its tokens and time scaled "
            "by frames from this request."
            if lv
            else f"No llama.cpp figure beside ours: {lwhy}."
        ),
    ]
    if r.get("video_whole_error"):
        notes.append(f"The whole 60 s clip's request was refused by our server: {r['video_whole_error']}.")
    held = sum(1 for d in r.get("peer_deltas", []) if d <= 1)
    if held:
        notes.append(
            f"In {held} of {len(r['peer_deltas'])} runs the peer's whole answer came in one chunk at its end: "
            "llama-cpp-python streams no text that does not decode as UTF-8 yet, and this synthetic model's "
            "random tokens are often parts of characters, so its TTFT there includes its decode of up to "
            f"{s.e2e_gen} tokens (a real model's answer streams from its first token)."
        )
    if r.get("peer_amx"):
        notes.append(
            "This llama.cpp build reports AMX_INT8: with its defaults the peer dies on its first image request "
            "(SIGSEGV: a general protection fault in libggml-cpu, its AMX weight buffers), so it runs with "
            "llama_model_params.use_extra_bufts = false, set by a launcher before the server's main() "
            "(llama-cpp-python's server has no setting for it): its weights stay in the mapped file, without "
            "CPU_REPACK either, where ours keeps CPU_REPACK by tensor name (§3b shows what each placement costs)."
        )
    if r.get("peer_skip"):
        notes.append(f"llama-cpp-python's server: not run: {r['peer_skip']}")
    elif r.get("peer_error"):
        what = f"its figures above are from the {len(p)} runs before" if peer_ok else "no figures from it"
        notes.append(f"llama-cpp-python's server failed part way ({what}): {r['peer_error']}")
    if peer_frac is None:
        notes.append(
            f"follow-up target (<= 0.05x) without the peer beside it: ours {frac:.3g}x, "
            f"{'met' if frac <= 0.05 else 'MISSED'}."
        )
    notes.append(
        f"servers ready after: ours {r['ours_ready_s']:.1f} s"
        + (f", peer {r['peer_ready_s']:.1f} s" if r.get("peer_ready_s") else "")
        + f"; in-process load {q['load_s']:.1f} s; the peer's prompt differs from ours: its chat format adds a "
        "system message and no empty thinking block."
    )
    return {"rows": rows, "notes": notes, "raw": {"serve": r, "in_process": q}}


def _whole_video_estimate(cap: dict, q: dict) -> float | None:
    t = cap.get("timings") or {}
    if not t or not cap.get("ttft_s") or not t.get("prompt_n"):
        return None
    vision, prefill = t["vision_ms"] / 1e3, t["prompt_ms"] / 1e3
    rest = cap["ttft_s"] - vision - prefill
    g = q["video_whole_groups"] / q["video_capped_groups"]
    return vision * g + prefill * q["video_whole_tokens"] / t["prompt_n"] + rest


def _peer_prompt(reply: dict) -> str:
    """llama-server's own prompt timing of the video request, where its stream carried one."""
    t = reply.get("timings") or {}
    if t.get("prompt_n") is None:
        n = (reply.get("usage") or {}).get("prompt_tokens")
        return f"its stream carried no timings (usage: {n} prompt tokens, the time to first token as measured)"
    return f"its timings: prompt {t.get('prompt_ms', 0) / 1e3:.2f} s for {t['prompt_n']} positions (images encoded)"


def _timings_line(t: dict | None) -> str:
    if not t:
        return "no timings"
    return (
        f"vision {t.get('vision_ms', 0) / 1e3:.2f} s, prefill {t.get('prompt_ms', 0) / 1e3:.2f} s for "
        f"{t.get('prompt_n')} positions, {t.get('cache_n')} reused from the KV cache"
    )


def _rss_line(st: dict) -> str:
    return f"{st['VmRSS']:.2f} (anonymous {st['RssAnon']:.2f}, files {st['RssFile']:.2f})"


# --------------------------------------------------------------------------- measured (bench.worker)


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in GB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 / GB
        for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's child process: end it if the worker dies (PR_SET_PDEATHSIG), so a killed
    benchmark never leaves a server holding gigabytes."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Server:
    """One server subprocess (its output goes to the worker's log) and an openai client for it."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str):
        import httpx
        import openai

        self.name, self.port, self.ready_path = name, port, ready_path
        self.base = f"http://127.0.0.1:{port}"
        print(f"serve: starting {name}: {' '.join(a if len(a) < 200 else '<launcher>' for a in cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        # trust_env=False: a proxy in the environment must not see loopback requests
        self.http = httpx.Client(trust_env=False, timeout=httpx.Timeout(3600.0, connect=10.0))
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="bench", max_retries=0, http_client=self.http)
        self.model = ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start until `ready_path` answers 200; RuntimeError if the process ends first."""
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited while loading ({self.exit_status()})")
            try:
                if self.http.get(self.base + self.ready_path, timeout=5.0).status_code == 200:
                    waited = time.perf_counter() - t0
                    self.model = self.http.get(self.base + "/v1/models").json()["data"][0]["id"]
                    return waited
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s")

    def exit_status(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "still running"
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"

    def status(self) -> dict[str, float]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self.http.close()


@dataclass
class Reply:
    ttft_s: float  # request sent -> first content delta (or the finish chunk, if no content came)
    total_s: float  # request sent -> stream closed
    decode_s: float | None  # first content delta -> the finish chunk
    text: str
    deltas: int  # content deltas received (1 for an answer released whole at its end)
    usage: dict | None
    timings: dict | None  # ours: llama-server's field names plus vision_ms


def ask(server: Server, msgs: list[dict], max_tokens: int, extra_body: dict | None = None) -> Reply:
    """One streamed chat completion, greedy."""
    t0 = time.perf_counter()
    t_first = t_finish = None
    parts: list[str] = []
    usage = timings = None
    stream = server.client.chat.completions.create(
        model=server.model,
        messages=msgs,
        stream=True,
        max_tokens=max_tokens,
        temperature=0,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    with stream:
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                if c.delta.content:
                    t_first = now if t_first is None else t_first
                    parts.append(c.delta.content)
                if c.finish_reason is not None:
                    t_finish = now
                    timings = (chunk.model_extra or {}).get("timings")
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
    t_end = time.perf_counter()
    first = t_first if t_first is not None else (t_finish or t_end)
    return Reply(
        first - t0,
        t_end - t0,
        (t_finish - t_first) if t_first is not None and t_finish is not None else None,
        "".join(parts),
        len(parts),
        usage,
        timings,
    )


def image_part(img) -> tuple[dict, int]:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": uri}}, len(data)


def library_has_amx() -> bool:
    import llama_cpp

    from minicpmv.runtime.weight_buffers import library_features

    return library_features(llama_cpp.llama_print_system_info().decode()).get("AMX_INT8") == "1"


def peer_command(a: dict, port: int) -> tuple[list[str], bool]:
    """llama-cpp-python's server, as the issue runs it; with extra buffer types off where its llama.cpp
    has AMX compiled in (its AMX weight buffers crash on the first image request)."""
    amx = library_has_amx()
    head = [sys.executable, "-c", PEER_NO_EXTRA_BUFTS] if amx else [sys.executable, "-m", "llama_cpp.server"]
    T = str(a["threads"])
    args = ["--model", a["lm"], "--clip_model_path", a["mmproj"], "--chat_format", PEER_CHAT_FORMAT]
    args += ["--n_ctx", str(PEER_CTX), "--n_threads", T, "--n_threads_batch", T, "--host", "127.0.0.1"]
    return head + args + ["--port", str(port)], amx


def peer_missing() -> str | None:
    missing = [m for m in ("llama_cpp.server", *PEER_MODULES) if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"llama-cpp-python's server needs its [server] extra ({', '.join(missing)} missing): "
            "pip install 'llama-cpp-python[server]==0.3.36' (or the project's dev extra)"
        )
    return None


def measure(a: dict) -> dict:
    """Both servers, the image question and follow-up (interleaved), then decode and video on ours."""
    from importlib import metadata

    from PIL import Image

    from ..media import picture, variant

    if importlib.util.find_spec("openai") is None:
        raise Skip("the openai client is not installed (pip install -e '.[dev]')")
    res: dict = {"openai_version": metadata.version("openai"), "peer_version": metadata.version("llama-cpp-python")}
    for k in (
        "ours_ttft_s",
        "ours_total_s",
        "ours_n_gen",
        "ours_first_usage",
        "ours_first_timings",
        "ours_follow_ttft_s",
        "ours_follow_timings",
        "ours_follow_usage",
        "ours_again_ttft_s",
        "ours_again_timings",
        "peer_ttft_s",
        "peer_deltas",
        "peer_total_s",
        "peer_follow_ttft_s",
        "ours_decode_tps",
        "ours_decode_n",
        "ours_decode_counter_tps",
    ):
        res[k] = []
    T = str(a["threads"])
    timeout = a.get("load_timeout", 900.0)
    ours = peer = None
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "minicpmv.cli.serve", "--model", a["lm"], "--mmproj", a["mmproj"], "-t", T]
        ours = Server("minicpm-serve", cmd + ["--port", str(port), *OURS_FLAGS], port, "/health")
        res["ours_ready_s"] = ours.wait_ready(timeout)
        res["ours_rss_load"] = ours.status()
        # loaded one after the other: ours measures its vision dtype at load (when not cached)
        res["peer_skip"] = peer_missing()
        if res["peer_skip"] is None:
            port = free_port()
            cmd, res["peer_amx"] = peer_command(a, port)
            peer = Server("llama-cpp-python server", cmd, port, "/v1/models")
            try:
                res["peer_ready_s"] = peer.wait_ready(timeout)
                res["peer_rss_load"] = peer.status()
            except RuntimeError as e:
                res["peer_skip"] = str(e)
                peer.stop()
                peer = None

        def on_peer(fn):
            """Run a peer request; if the peer fails, record why and go on without it."""
            nonlocal peer
            if peer is None:
                return None
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - any failure of the peer ends its part, not ours
                time.sleep(1.0)
                res["peer_error"] = f"{type(e).__name__}: {e} (the server: {peer.exit_status()})"
                peer.stop()
                peer = None
                return None

        # warm-up: one small picture on each side (thread pools, lazily made contexts, the peer's mtmd)
        small, _ = image_part(picture(448, 448, seed=2))
        warm = [{"role": "user", "content": [small, {"type": "text", "text": QUESTION}]}]
        ask(ours, warm, 2)
        on_peer(lambda: ask(peer, warm, 2))

        img = Image.open(a["image"]).convert("RGB")
        for r in Runs(a["runs"], a.get("budget_s")):
            part, res["image_png_bytes"] = image_part(variant(img, r + 1))
            msgs = [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]

            def run_ours(msgs=msgs, r=r):
                first = ask(ours, msgs, a["e2e_gen"])
                if r == 0:
                    res["ours_rss_first"] = ours.status()
                res["ours_ttft_s"].append(first.ttft_s)
                res["ours_total_s"].append(first.total_s)
                res["ours_n_gen"].append((first.usage or {}).get("completion_tokens"))
                res["ours_first_usage"].append(first.usage or {})
                res["ours_first_timings"].append(first.timings)
                time.sleep(READ_PAUSE_S)
                msgs2 = _follow_up(msgs, first.text, FOLLOW_UP)
                follow = ask(ours, msgs2, a["e2e_gen"])
                res["ours_follow_ttft_s"].append(follow.ttft_s)
                res["ours_follow_timings"].append(follow.timings)
                res["ours_follow_usage"].append(follow.usage or {})
                again = ask(ours, _follow_up(msgs2, follow.text, SECOND_FOLLOW_UP), a["e2e_gen"])  # no pause
                res["ours_again_ttft_s"].append(again.ttft_s)
                res["ours_again_timings"].append(again.timings)

            def run_peer(msgs=msgs, r=r):
                first = ask(peer, msgs, a["e2e_gen"])
                if r == 0:
                    res["peer_rss_first"] = peer.status()
                if r == 0:  # it re-encodes the image for a follow-up: once is enough to show it
                    time.sleep(READ_PAUSE_S)
                    follow = ask(peer, _follow_up(msgs, first.text, FOLLOW_UP), a["e2e_gen"])
                    res["peer_follow_ttft_s"].append(follow.ttft_s)
                res["peer_ttft_s"].append(first.ttft_s)
                res["peer_total_s"].append(first.total_s)
                res["peer_deltas"].append(first.deltas)

            # alternate which side goes first, so neither always pays (or always skips) a first-run cost
            order = [run_ours, lambda run_peer=run_peer: on_peer(run_peer)]
            for side in order if r % 2 == 0 else order[::-1]:
                side()

        # the peer is done: stopped before the decode runs, which compare ours with chat() in a process
        # alone (two mappings of the same GGUF slowed one side in §3's single process)
        if peer is not None:
            res["peer_rss_end"] = peer.status()
            peer.stop()
            peer = None

        # decode, ours only (the peer's would measure llama-cpp-python, not the target)
        for text in a["prompts"]:
            d = ask(ours, [{"role": "user", "content": text}], a["n_gen"])
            n = (d.usage or {}).get("completion_tokens") or 0
            res["ours_decode_tps"].append(n / d.decode_s if d.decode_s else 0.0)
            res["ours_decode_n"].append(n)
            res["ours_decode_counter_tps"].append((d.timings or {}).get("predicted_per_second"))

        # the 60 s video, ours only
        data = Path(a["video"]).read_bytes()
        res["video_bytes"] = len(data)
        uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
        vmsgs = [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": VIDEO_QUESTION}],
            }
        ]
        res["video_capped"] = vars(
            ask(ours, vmsgs, 4, {"mm_processor_kwargs": {"packing": PACKING, "max_frames": a["video_groups"]}})
        )
        if a.get("whole_video"):
            import openai

            try:
                res["video_whole"] = vars(ask(ours, vmsgs, 4, {"mm_processor_kwargs": {"packing": PACKING}}))
            except openai.APIStatusError as e:  # refused (e.g. a context too small): reported, the rest stands
                res["video_whole_error"] = f"HTTP {e.status_code}: {e.message}"
        res["ours_rss_end"] = ours.status()
    finally:
        for srv in (peer, ours):
            if srv is not None:
                srv.stop()
    return res


def _follow_up(msgs: list[dict], answer: str, question: str) -> list[dict]:
    return msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def in_process(a: dict) -> dict:
    """What the server is compared with: `MiniCPMV.load` as minicpm-run makes it (session.model.open_model,
    the same options) and its RSS, decode tokens/s of `chat()` with the options the server passes, and the
    video's prompt tokens counted with the server's media loader."""
    from minicpmv.session.limits import Limits
    from minicpmv.session.media import load_upload
    from minicpmv.session.model import choose_files, open_model
    from minicpmv.session.options import ChatOptions, MediaOptions, ModelOptions

    mo = ModelOptions(model=Path(a["lm"]), mmproj=Path(a["mmproj"]), threads=a["threads"])
    t0 = time.perf_counter()
    model = open_model(choose_files(mo), mo)
    res: dict = {"load_s": time.perf_counter() - t0, "rss_load": proc_status()}

    def timed(text: str, n: int) -> tuple[float, int, float]:
        opts = ChatOptions(max_tokens=n, temperature=0, greedy=True)  # what a temperature-0 request becomes
        stream = model.chat([{"role": "user", "content": [text]}], stream=True, **opts.chat_kwargs())
        t_first = None
        for piece in stream:
            if piece and t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        st = stream.result.stats
        return (
            (st.decode_tokens / (t_end - t_first) if t_first and t_end > t_first else 0.0),
            st.decode_tokens,
            st.decode_tps,
        )

    timed("Hello", 4)  # warm-up
    res["decode_tps"], res["decode_n"], res["decode_counter_tps"] = [], [], []
    for text in a["prompts"]:
        tps, n, counter = timed(text, a["n_gen"])
        res["decode_tps"].append(tps)
        res["decode_n"].append(n)
        res["decode_counter_tps"].append(counter)

    data = Path(a["video"]).read_bytes()
    limits = Limits(max_video_frames=MAX_VIDEO_FRAMES)
    for name, media in (
        ("whole", MediaOptions(packing=PACKING)),
        ("capped", MediaOptions(packing=PACKING, max_frames=a["video_groups"])),
    ):
        v = load_upload(data, "video", media, limits, kind="video")
        prompt = model.build_prompt([{"role": "user", "content": [v, VIDEO_QUESTION]}])
        res[f"video_{name}_tokens"] = len(model.prompt_token_ids(prompt))
        res[f"video_{name}_frames"] = len(v.frames)
        res[f"video_{name}_groups"] = len(v.temporal_ids)
    res["rss_end"] = proc_status()
    model.close()
    return res
