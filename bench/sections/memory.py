"""§5b Memory: peak RSS of the image question and of the first video frames, default and low-memory
profiles, with a memory timeline (RSS and its anonymous / file-backed parts over time, phases marked).

The peaks are the measuring subprocesses' own VmHWM (the whole process: interpreter, torch,
llama.cpp); the CLI is measured as a user runs it, the Python API runs in a worker that samples
/proc/self/status every 50 ms in a background thread and marks the phases (load, vision, language
model prefill, decode). The low-memory profile's cost is its time to first token and how far its
first-token logits move from the default profile's (q8_0 KV cache, the same vision numbers).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np

from minicpmv.cpu import cpu_info

from .. import ours
from ..common import GB, log_tail, run_cmd
from ..report import row
from ..session import Session
from .sizes import cli_command

QUESTION = "What is in the image?"
VIDEO_QUESTION = "Describe the video."
TARGET_DEFAULT, TARGET_LOW = 7.0, 6.0
PROFILES = {"default": {}, "low-memory": {"low_memory": True}}


def run(bench: Session) -> dict:
    s = bench.scale
    image, video = bench.image(), bench.video()
    rows, notes, raw = [], [], {}
    # the CLI, as a user runs it
    cli = cli_command()
    cli_peak = {}
    for name, flag in (("default", []), ("low-memory", ["--low-memory"])):
        cmd = cli + [
            str(image),
            QUESTION,
            "--model",
            str(bench.lm),
            "--mmproj",
            str(bench.mmproj),
            "--ctx",
            "4096",
            "--threads",
            str(bench.threads),
            "--max-tokens",
            str(s.e2e_gen),
            "--json",
            *flag,
        ]
        rc, wall, peak = bench.step(f"memory:cli {name}", run_cmd, cmd, log=bench.log)
        cli_peak[name] = peak if rc == 0 else None
        if rc != 0:
            notes.append(f"minicpm-run {' '.join(flag)} failed (exit {rc}): {log_tail(bench.log, 3).strip()}")
    # the Python API with a timeline, image and the first frames of the video, both profiles
    runs = {}
    for what, src in (("image", {"image": str(image)}), ("video", {"video": str(video), "groups": 2})):
        for name, kw in PROFILES.items():
            logits = bench.log.parent / f"memory-{what}-{name}.npy"
            m = bench.worker(
                "memory_profile",
                {
                    "lm": str(bench.lm),
                    "mmproj": str(bench.mmproj),
                    "threads": bench.threads,
                    "n_ctx": 4096,
                    "n_gen": s.e2e_gen,
                    "load": kw,
                    "logits": str(logits),
                    **src,
                },
            )
            runs[(what, name)] = (m, logits)
    mtmd = bench.worker(
        "e2e",
        {
            "lm": str(bench.lm),
            "mmproj": str(bench.mmproj),
            "image": str(image),
            "threads": bench.threads,
            "runs": 1,
            "n_gen": s.e2e_gen,
            "n_ctx": 4096,
            "warmup": 0,
            "sides": ["mtmd"],
        },
    )

    def peak(what, name):
        return runs[(what, name)][0].peak_rss_gb

    rows += [
        row(
            "peak RSS, 1344x1344 question, minicpm-run, ctx 4096",
            cli_peak["default"],
            mtmd.peak_rss_gb,
            unit="GB",
            target=f"ours <= {TARGET_DEFAULT:g} GB",
            met=_le(cli_peak["default"], TARGET_DEFAULT),
        ),
        row(
            "peak RSS, same, minicpm-run --low-memory",
            cli_peak["low-memory"],
            None,
            unit="GB",
            target=f"<= {TARGET_LOW:g} GB",
            met=_le(cli_peak["low-memory"], TARGET_LOW),
        ),
        row(
            "peak RSS, 1344x1344 question, Python API, default",
            peak("image", "default"),
            None,
            unit="GB",
            target=f"<= {TARGET_DEFAULT:g} GB",
            met=_le(peak("image", "default"), TARGET_DEFAULT),
        ),
        row(
            "peak RSS, same, Python API, low_memory=True",
            peak("image", "low-memory"),
            None,
            unit="GB",
            target=f"<= {TARGET_LOW:g} GB",
            met=_le(peak("image", "low-memory"), TARGET_LOW),
        ),
        row(
            "peak RSS, first 6 frames of the 60 s video, default",
            peak("video", "default"),
            None,
            unit="GB",
            target=f"<= {TARGET_DEFAULT:g} GB",
            met=_le(peak("video", "default"), TARGET_DEFAULT),
        ),
        row(
            "peak RSS, same, low_memory=True",
            peak("video", "low-memory"),
            None,
            unit="GB",
            target=f"<= {TARGET_LOW:g} GB",
            met=_le(peak("video", "low-memory"), TARGET_LOW),
        ),
    ]
    for what in ("image", "video"):
        d, lo = runs[(what, "default")][0].result, runs[(what, "low-memory")][0].result
        ld, ll = np.load(runs[(what, "default")][1]), np.load(runs[(what, "low-memory")][1])
        diff = float(np.abs(ld - ll).max() / (ld.max() - ld.min()))
        label = "1344x1344 question" if what == "image" else "first 6 video frames"
        rows.append(
            row(
                f"low-memory cost: time to first token, {label}",
                lo["ttft_s"],
                None,
                unit="s",
                note=f"default {d['ttft_s']:.1f} s, {lo['ttft_s'] / d['ttft_s']:.3f}x",
            )
        )
        rows.append(
            row(
                f"low-memory cost: first-token logits max |diff| / logit range, {label}",
                diff,
                None,
                note=f"argmax {'same' if int(ld.argmax()) == int(ll.argmax()) else 'differs'}",
            )
        )
        raw[what] = {"default": d, "low-memory": lo, "logit_diff": diff}
    for (what, name), (m, _) in runs.items():
        notes.append(f"{what}, {name}: " + _phase_line(m.result))
    from minicpmv.runtime.vision import SUB_BATCH_TOKENS  # what the runs above used

    chart = chart_name(cpu_info().model)
    notes += [
        "What the memory is (8B Q4_K_M, ctx 4096): the language model's weights, 4.7 GB: the 3.4 GB that "
        "llama.cpp copies into its CPU_REPACK layout and the 1.3 GB of Q6_K and norm tensors it uses in place "
        "from the mapped file (the 'files' part of the timeline), while the pages of the copied tensors and of "
        "the 0.35 GB token embedding table are dropped from the mapping as the load goes (runtime/weight_pages.py; "
        "reading the file instead kept 5.0 GB resident), its KV cache (576 MiB f16, 306 MiB q8_0) and compute "
        "buffer (108 MiB: sized for one output row, not n_batch rows of the 151k vocabulary), the vision "
        "tower's and the resampler's weights in bf16 (0.97 GB; low-memory: read from the mmproj for each image "
        "instead), the "
        "interpreter and libraries (~0.3 GB).",
        "Transients, and what became of them: the language model's whole file, faulted in when llama.cpp maps "
        "it (MAP_POPULATE), then given back down to the in-place tensors as the load goes (the load phase's "
        "peak); the mmproj's mapped pages while the vision weights load (the "
        "vision encoder loads first, before the language model, and the map is closed afterwards); the vision "
        "activations, bounded by running the tower and the resampler over sub-batches of whole slices "
        f"({SUB_BATCH_TOKENS} patches; low-memory: one slice) instead of a whole image (0.6 GB before); "
        "low-memory: the resampler's matrices (0.1 GB), read per image instead of kept (the default keeps "
        "them: reading them cost ~0.2 s a call); the KV cache and compute buffer, made after the "
        "first turn's images are encoded (so they are never resident together with the vision activations on "
        "a first turn); freed heap returned to the OS after each encode (malloc_trim).",
        "llama.cpp figure: its own pipeline (`mtmd_tokenize` + `mtmd_helper_eval_chunks` + decode loop, same "
        "files, ctx 4096, same threads) in a subprocess, default weight mapping (mmap) as llama-mtmd-cli; "
        "its peak RSS counts the mapped LM file's pages next to the repacked copy.",
        f"Timeline: {chart} (image question, both profiles).",
    ]
    svg = _svg({name: runs[("image", name)][0].result for name in PROFILES})
    return {"rows": rows, "notes": notes, "raw": raw, "files": {chart: svg}}


def chart_name(cpu: str) -> str:
    """One timeline file per CPU: BENCHMARKS.md keeps a report per CPU, so one name would be overwritten."""
    return "BENCHMARKS-memory-" + re.sub(r"[^a-z0-9]+", "-", cpu.lower().replace("(r)", "")).strip("-") + ".svg"


def _le(v, target) -> bool | None:
    return None if v is None else v <= target


def _phase_line(r: dict) -> str:
    parts = [
        f"{p['phase']} {p['start']:.2f}->{p['end']:.2f} GB (peak {p['peak']:.2f}, {p['seconds']:.1f} s)"
        for p in r["phases"]
    ]
    return "; ".join(parts) + f"; anonymous at the peak {r['peak_anon']:.2f} GB, files {r['peak_file']:.2f} GB"


def _svg(results: dict[str, dict]) -> str:
    """RSS over time of each profile's image question, phases marked, as a small SVG chart."""
    W, H, L, B = 760, 300, 50, 30
    t_max = max(r["samples"][-1][0] for r in results.values())
    m_max = max(max(s[1] for s in r["samples"]) for r in results.values())
    m_max = max(8.0, np.ceil(m_max))
    x = lambda t: L + (W - L - 10) * t / t_max  # noqa: E731
    y = lambda g: H - B - (H - B - 10) * g / m_max  # noqa: E731
    colors = {"default": "#1f77b4", "low-memory": "#d62728"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
    ]
    for g in range(0, int(m_max) + 1):
        out.append(
            f'<line x1="{L}" x2="{W - 10}" y1="{y(g):.1f}" y2="{y(g):.1f}" stroke="#eee"/>'
            f'<text x="{L - 6}" y="{y(g) + 4:.1f}" text-anchor="end">{g} GB</text>'
        )
    for target, dash in ((TARGET_DEFAULT, "6,3"), (TARGET_LOW, "2,3")):
        out.append(
            f'<line x1="{L}" x2="{W - 10}" y1="{y(target):.1f}" y2="{y(target):.1f}" stroke="#888" '
            f'stroke-dasharray="{dash}"/>'
        )
    for i, (name, r) in enumerate(results.items()):
        pts = " ".join(f"{x(t):.1f},{y(rss):.1f}" for t, rss, _anon, _file in r["samples"])
        c = colors.get(name, "#333")
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        out.append(f'<text x="{W - 200}" y="{20 + 14 * i}" fill="{c}">{name}: peak {r["peak"]:.2f} GB</text>')
        for p in r["phases"]:
            out.append(
                f'<line x1="{x(p["t0"]):.1f}" x2="{x(p["t0"]):.1f}" y1="{y(m_max):.1f}" y2="{H - B}" '
                f'stroke="{c}" stroke-opacity="0.25"/>'
            )
            if i == 0:
                out.append(f'<text x="{x(p["t0"]) + 2:.1f}" y="{H - B + 12}">{p["phase"]}</text>')
    out.append(
        f'<text x="{W / 2:.0f}" y="{H - 4}" text-anchor="middle">seconds ({t_max:.0f} s in all); '
        f"dashed: 7 GB and 6 GB targets</text></svg>"
    )
    return "\n".join(out)


# --------------------------------------------------------------------------- measured (bench.worker)


class _Sampler:
    """RSS, RssAnon and RssFile (GB) of this process every `period` seconds, and phase marks."""

    def __init__(self, period: float = 0.05):
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float, float, float]] = []
        self.marks: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> tuple[float, float, float]:
        text = Path("/proc/self/status").read_text()
        return tuple(
            int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 / GB for k in ("VmRSS", "RssAnon", "RssFile")
        )

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, *self.status()))
            time.sleep(period)

    def mark(self, phase: str) -> None:
        self.samples.append((time.perf_counter() - self.t0, *self.status()))
        self.marks.append((time.perf_counter() - self.t0, phase))

    def stop(self) -> dict:
        self.mark("end")
        self._stop.set()
        self._thread.join()
        s = self.samples
        top = max(s, key=lambda v: v[1])
        phases = []
        for (a, name), (b, _) in zip(self.marks, self.marks[1:]):
            inside = [v for v in s if a <= v[0] <= b]
            phases.append(
                {
                    "phase": name,
                    "t0": a,
                    "seconds": b - a,
                    "start": inside[0][1],
                    "end": inside[-1][1],
                    "peak": max(v[1] for v in inside),
                }
            )
        step = max(1, len(s) // 600)
        return {
            "samples": s[::step] + [s[-1]],
            "phases": phases,
            "peak": top[1],
            "peak_anon": top[2],
            "peak_file": top[3],
        }


def profile(a: dict) -> dict:
    """One question (an image, or the first `groups` frame groups of a video) through the Python API,
    with a memory timeline; saves the first-token logits to a["logits"]."""
    smp = _Sampler()
    smp.mark("load")
    MiniCPMV = ours.need("runtime", "MiniCPMV")
    model = MiniCPMV.load(a["lm"], a["mmproj"], n_ctx=a["n_ctx"], n_threads=a["threads"], **a["load"])
    kw: dict = {}
    if "image" in a:
        from minicpmv.runtime.image import load_image

        msgs = [{"role": "user", "content": [load_image(a["image"]), QUESTION]}]
    else:
        from minicpmv.runtime.video import load_video

        from .video import video_parts

        v = load_video(a["video"], fps=5, packing=3)
        frames, groups = video_parts(v)
        groups = groups[: a["groups"]]
        frames = frames[: sum(len(g) for g in groups)]
        msgs = [{"role": "user", "content": frames + [VIDEO_QUESTION]}]
        kw = dict(temporal_ids=groups, use_image_id=False, max_slice_nums=1)
    enc = model.vision.encode_slices

    def encode(*args, **kwargs):
        smp.mark("vision")
        out = enc(*args, **kwargs)
        smp.mark("prefill")
        return out

    model.vision.encode_slices = encode
    t = time.perf_counter()
    logits = model.prefill(msgs, **kw)
    ttft = time.perf_counter() - t
    vision_s = sum(model.stats.vision_ms) / 1e3
    np.save(a["logits"], logits)
    smp.mark("decode")
    answer = model.chat(msgs, greedy=True, max_new_tokens=a["n_gen"], **kw)
    res = smp.stop()
    res.update(ttft_s=ttft, vision_s=vision_s, decode_tokens=answer.stats.decode_tokens, n_ctx=answer.stats.n_ctx)
    return res
