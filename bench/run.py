"""`make bench`: every figure of BENCHMARKS.md, ours vs llama.cpp, in one run.

    python -m bench.run [--only conversion,vision,llm,e2e,video,sizes,lowbit] [--threads N]
                        [--scale full|medium] [--runs N] [--budget-min M] [--out DIR] [--prepare]

The full-size synthetic checkpoint (~17.4 GB bf16) is generated once into the cache folder
(.cache/bench, or $MINICPMV_BENCH_CACHE); `--prepare` only does that (and converts our Q4_K_M +
f16 mmproj, untimed). Every measured step runs in its own subprocess (bench.worker) so its peak
RSS is its own. Repetitions are cut when the next one would not leave time for the remaining
sections within --budget-min (60 at full scale). `--scale medium` checks the whole harness in a
few minutes and writes its report under the cache folder, not into the repository.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import report
from .common import (GB, REPO, BenchError, Skip, cache_root, dir_bytes, evict_page_cache, free_bytes,
                     loadavg, machine_info, median, run_cmd, run_worker, log_tail)
from .report import row

SECTIONS = ["conversion", "vision", "llm", "e2e", "video", "sizes", "lowbit"]


@dataclass(frozen=True)
class Scale:
    name: str
    ckpt_gb: float            # synthetic checkpoint on disk
    bf16_gb: float            # BF16 LM GGUF (two-step intermediate)
    q4_gb: float              # one Q4_K_M LM GGUF
    mmproj_gb: float          # f16 mmproj
    runs: int                 # default repetitions (vision, llm)
    e2e_runs: int
    n_prompt: int = 512
    n_gen: int = 128
    e2e_gen: int = 32         # tokens generated after the image question
    video_subset: int = 12    # frames measured (a multiple of the packing); the rest is scaled
    est: dict = field(default_factory=dict)   # seconds per step, for the estimate and the progress bar
    floor: dict = field(default_factory=dict)  # seconds a section needs at least (load, warm-up, one run)
    fixed: dict = field(default_factory=dict)  # seconds of a section spent before its measured runs


SCALES = {
    # seconds on the 2-core EPYC (AVX512-BF16) this was written on, extrapolated to an idle machine from
    # single runs made while other jobs were loading it
    "full": Scale("full", 17.4, 16.4, 5.0, 1.1, runs=3, e2e_runs=2, video_subset=6, est={
        "checkpoint": 420, "convert_onepass": 480, "convert_bf16": 200, "llama_quantize": 480, "compare": 60,
        "models": 900, "vision": 150, "llm": 420, "e2e": 600, "video": 330, "sizes": 300, "lowbit": 23000},
        floor={"vision": 100, "llm": 200, "e2e": 400, "video": 330, "sizes": 300},
        fixed={"vision": 70, "llm": 60, "e2e": 120}),
    "medium": Scale("medium", 0.06, 0.05, 0.02, 0.02, runs=3, e2e_runs=3, est={
        "checkpoint": 2, "convert_onepass": 5, "convert_bf16": 4, "llama_quantize": 3, "compare": 1,
        "models": 8, "vision": 10, "llm": 15, "e2e": 15, "video": 30, "sizes": 15, "lowbit": 300}),
}

LM_NAME = "MiniCPM-V-4.5-Q4_K_M.gguf"
MMPROJ_NAME = "mmproj-MiniCPM-V-4.5-F16.gguf"


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = SCALES[args.scale]
        self.threads = args.threads
        self.runs = args.runs or self.scale.runs
        self.e2e_runs = args.runs or self.scale.e2e_runs
        self.cache = cache_root()
        self.ckpt = self.cache / f"{self.scale.name}-ckpt"
        self.work = self.cache / f"{self.scale.name}-gguf"
        self.models = self.work / "onepass"
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.log = self.cache / "logs" / f"{self.scale.name}-{stamp}.log"
        self.sizes: dict[str, int] = {}
        self.bar: tqdm | None = None
        self.budget_s = None if not args.budget_min else args.budget_min * 60.0
        self.t_start = time.perf_counter()
        self.plan: list[str] = []
        self.loads: list[tuple[float, float]] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------------ helpers

    @property
    def lm(self) -> Path:
        return self.models / LM_NAME

    @property
    def mmproj(self) -> Path:
        return self.models / MMPROJ_NAME

    def step(self, name: str, fn, *a, **kw):
        """Run one step under the progress bar."""
        if self.bar is not None:
            self.bar.set_description(name)
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            if self.bar is not None:
                self.bar.update(self.scale.est.get(name.split(":")[0], 0))
                self.bar.set_postfix_str(f"{name} {time.perf_counter() - t0:.0f}s")

    def runs_budget(self, name: str) -> float | None:
        """Seconds the measured runs of section `name` may take so that the sections after it
        still fit in --budget-min (each needs at least its floor); None = no limit."""
        if self.budget_s is None:
            return None
        left = self.budget_s - (time.perf_counter() - self.t_start)
        later = self.plan[self.plan.index(name) + 1:] if name in self.plan else []
        return max(0.0, left - sum(self.scale.floor.get(s, 0) for s in later) - self.scale.fixed.get(name, 0))

    def worker(self, task: str, args: dict, timeout: float | None = None):
        return self.step(task, run_worker, task, args, log=self.log, timeout=timeout)

    def _monitor(self) -> None:
        while not self._stop.wait(5.0):
            self.loads.append((time.time(), loadavg()[0]))

    # ------------------------------------------------------------------ disk and inputs

    def ckpt_ready(self) -> bool:
        return (self.ckpt / ".complete").is_file()

    def models_ready(self) -> bool:
        return self.lm.is_file() and self.mmproj.is_file()

    def disk_plan(self, sections: list[str]) -> float:
        """GB this run will need on top of what is already cached."""
        s = self.scale
        need = 0.0 if self.ckpt_ready() else s.ckpt_gb
        if "conversion" in sections:
            # one pass (kept) + BF16 + llama's Q4_K_M, the last two deleted after measuring
            need += (0 if self.models_ready() else s.q4_gb + s.mmproj_gb) + s.bf16_gb + s.q4_gb
        elif not self.models_ready():
            need += s.q4_gb + s.mmproj_gb + s.bf16_gb   # fallback path may need the BF16 transiently
        return need + (2.0 if s.name == "full" else 0.1)

    def check_disk(self, sections: list[str]) -> None:
        need = self.disk_plan(sections)
        free = free_bytes(self.cache) / GB
        print(f"disk: need about {need:.1f} GB in {self.cache}, {free:.1f} GB free", file=sys.stderr)
        if free < need:
            raise SystemExit(f"bench: not enough free disk in {self.cache}: need about {need:.1f} GB "
                             f"(checkpoint {self.scale.ckpt_gb} GB, BF16 GGUF {self.scale.bf16_gb} GB, two Q4_K_M "
                             f"{self.scale.q4_gb} GB each), have {free:.1f} GB; free space or set MINICPMV_BENCH_CACHE")

    def make_ckpt(self) -> None:
        if self.ckpt_ready():
            return
        from minicpmv.convert.synthetic import make_checkpoint
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.ckpt, ignore_errors=True)
        make_checkpoint(tmp, self.scale.name, progress=True)
        (tmp / ".complete").write_text("ok\n")
        tmp.rename(self.ckpt)

    def make_models(self) -> list[str]:
        """Our Q4_K_M LM + f16 mmproj for the runtime sections (untimed) when the conversion
        section did not leave them. Falls back to llama_model_quantize if our K-quants fail."""
        if self.models_ready():
            return []
        self.models.mkdir(parents=True, exist_ok=True)
        try:
            self.worker("convert_onepass", {"ckpt": str(self.ckpt), "out": str(self.models), "threads": self.threads})
            return []
        except (BenchError, Skip) as e:
            print(f"bench: one-pass Q4_K_M conversion failed, falling back to llama_model_quantize: "
                  f"{str(e).splitlines()[0]}", file=sys.stderr)
        tmp = self.work / "fallback"
        self.worker("convert_bf16", {"ckpt": str(self.ckpt), "out": str(tmp), "threads": self.threads})
        bf16 = next(tmp.glob("*-BF16.gguf"))
        self.worker("llama_quantize", {"src": str(bf16), "dst": str(self.lm), "threads": self.threads})
        shutil.rmtree(tmp, ignore_errors=True)
        self.worker("convert_onepass", {"ckpt": str(self.ckpt), "out": str(self.models), "threads": self.threads,
                                        "write_lm": False})
        return ["the Q4_K_M language model used below was made by llama_model_quantize (our one-pass K-quant "
                "conversion was unavailable)"]

    def image(self) -> Path:
        p = self.cache / "inputs" / "picture-1344.png"
        if not p.is_file():
            from .media import picture
            p.parent.mkdir(parents=True, exist_ok=True)
            picture(1344, 1344).save(p)
        return p

    def video(self) -> Path:
        p = self.cache / "inputs" / "shapes-60s-10fps-448x252.mp4"
        if not p.is_file():
            from .media import make_video
            make_video(p, seconds=60, fps=10, size=(448, 252))
        return p

    # ------------------------------------------------------------------ sections

    def sec_conversion(self) -> dict:
        T = self.threads
        one = self.work / "onepass"
        two = self.work / "twostep"
        shutil.rmtree(two, ignore_errors=True)
        for f in (one / LM_NAME, one / MMPROJ_NAME):
            f.unlink(missing_ok=True)
        evict_page_cache(self.ckpt)
        m1 = self.worker("convert_onepass", {"ckpt": str(self.ckpt), "out": str(one), "threads": T})
        self.sizes["Q4_K_M LM GGUF, ours (one pass)"] = Path(m1.result["lm"]).stat().st_size
        self.sizes["f16 mmproj GGUF"] = Path(m1.result["mmproj"]).stat().st_size
        evict_page_cache(self.ckpt)
        try:
            m2 = self.worker("convert_bf16", {"ckpt": str(self.ckpt), "out": str(two), "threads": T})
            bf16 = Path(m2.result["lm"])
            self.sizes["BF16 LM GGUF (two-step intermediate)"] = bf16.stat().st_size
            llama_q4 = two / "llama-Q4_K_M.gguf"
            m3 = self.worker("llama_quantize", {"src": str(bf16), "dst": str(llama_q4), "threads": T})
            bf16.unlink()      # free 16 GB as soon as it is measured
            self.sizes["Q4_K_M LM GGUF, llama_model_quantize"] = llama_q4.stat().st_size
            same = self.step("compare", compare_tensors, Path(m1.result["lm"]), llama_q4)
        finally:
            shutil.rmtree(two, ignore_errors=True)   # the two-step files are not needed later

        t_one = m1.result["seconds"]
        t_two = m2.result["seconds"] + m3.result["seconds"]
        rss_two = max(m2.peak_rss_gb, m3.peak_rss_gb)
        rows = [
            row("wall time", t_one, t_two, unit="s", target="< 1x (faster)", met=t_one < t_two,
                note="one pass also writes the f16 mmproj"),
            row("peak RSS", m1.peak_rss_gb, rss_two, unit="GB", target="ours < 3 GB", met=m1.peak_rss_gb < 3.0),
        ]
        notes = [
            "One run per path (each takes minutes at full size); the checkpoint's pages are evicted from the page "
            "cache (posix_fadvise DONTNEED) before each path, so both read it cold.",
            f"two-step = our HF -> BF16 GGUF ({m2.result['seconds']:.1f} s, peak {m2.peak_rss_gb:.2f} GB) + "
            f"llama_model_quantize BF16 -> Q4_K_M with {T} threads ({m3.result['seconds']:.1f} s, peak "
            f"{m3.peak_rss_gb:.2f} GB); its peak RSS is the larger of the two steps.",
            f"one pass = HF -> Q4_K_M LM + f16 mmproj, {T} threads; subprocess wall incl. interpreter start "
            f"{m1.wall_s:.1f} s.",
            f"tensor data of our Q4_K_M vs llama_model_quantize's: {same}.",
            "peak RSS = the measuring subprocess's ru_maxrss (os.wait4), which counts the pages of mmapped files it "
            "touched (llama_model_quantize maps its input).",
        ]
        return {"rows": rows, "notes": notes, "raw": {"onepass": vars_m(m1), "bf16": vars_m(m2), "quantize": vars_m(m3)}}

    def sec_vision(self) -> dict:
        m = self.worker("vision", {"lm": str(self.lm), "mmproj": str(self.mmproj), "threads": self.threads,
                                   "runs": self.runs, "warmup": 1, "budget_s": self.runs_budget("vision")})
        r = m.result
        mt = r["mtmd_s"]
        rows = []
        for dt_, target in (("bf16", 0.4), ("f32", 0.9)):
            o = r[f"ours_{dt_}_s"]
            ratio = median([a / b for a, b in zip(o, mt)])
            rows.append(row(f"seconds per slice, ours {dt_} compute", median(o), median(mt), unit="s", ratio=ratio,
                            target=f"<= {target}x", met=ratio <= target))
        wb = r["weights_nbytes"]
        for dt_ in ("bf16", "f32"):
            if wb.get(dt_):
                rows.append(row(f"vision weights resident, ours {dt_}", wb[dt_] / GB, r["mmproj_file_bytes"] / GB,
                                unit="GB", note="llama.cpp: the f16 mmproj's tensors"))
        notes = [f"same f16 mmproj, {self.threads} threads both; mtmd = `mtmd_encode_chunk` of a 448x448 image "
                 "(one chunk, 1024 patches); ours = `VisionEncoder.encode_slices` of the same pixels; preprocessing "
                 "excluded on both sides.",
                 f"{len(mt)} runs after 1 warm-up; per-run seconds: mtmd {fmt_list(mt)}, bf16 "
                 f"{fmt_list(r['ours_bf16_s'])}, f32 {fmt_list(r['ours_f32_s'])}; load time of ours "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in r["load_s"].items()) + ".",
                 f"vision worker peak RSS {m.peak_rss_gb:.2f} GB (both of our encoders and mtmd loaded together)."]
        return {"rows": rows, "notes": notes, "raw": r}

    def sec_llm(self) -> dict:
        s = self.scale
        m = self.worker("llm", {"lm": str(self.lm), "mmproj": str(self.mmproj), "threads": self.threads,
                                "runs": self.runs, "n_prompt": s.n_prompt, "n_gen": s.n_gen,
                                "n_ctx": s.n_prompt + s.n_gen + 64,
                                "budget_s": self.runs_budget("llm")})
        r = m.result
        rows = []
        for what, target in (("prefill", None), ("decode", 0.97)):
            o, b = r[f"ours_{what}_tps"], r[f"bare_{what}_tps"]
            ratio = median([x / y for x, y in zip(o, b)])
            rows.append(row(f"{what} tokens/s", median(o), median(b), unit="tok/s", ratio=ratio, better="higher",
                            target=f">= {target}x" if target else "", met=(ratio >= target) if target else None))
        notes = [f"same Q4_K_M GGUF, {self.threads} threads; llama.cpp = a bare `llama_decode` loop (one 512-token "
                 "batch, then greedy one-token decodes); ours = `MiniCPMV.chat` on a text-only message of the same "
                 "length (stream=True, default sampling: penalty, top-k, temperature, top-p), prefill = prompt "
                 "tokens / time to first token (ours: the runtime's own ttft counter, which includes building and tokenizing "
                 "the prompt), decode = one-token `llama_decode` calls after the first token / (total - time to first "
                 "token) (ours decodes every sampled token, the bare loop all but the last).",
                 f"{len(r['bare_decode_tps'])} runs after a warm-up; prompt tokens (bare, ours) {r['n_prompt']}; generated "
                 f"(asked, ours) {r.get('n_gen')}.",
                 f"per-run decode tok/s: bare {fmt_list(r['bare_decode_tps'])}, ours {fmt_list(r['ours_decode_tps'])}."]
        return {"rows": rows, "notes": notes, "raw": r}

    def sec_e2e(self) -> dict:
        s = self.scale
        m = self.worker("e2e", {"lm": str(self.lm), "mmproj": str(self.mmproj), "image": str(self.image()),
                                "threads": self.threads, "runs": self.e2e_runs, "n_gen": s.e2e_gen, "n_ctx": 4096,
                                "warmup": 1, "budget_s": self.runs_budget("e2e")})
        r = m.result
        rows = []
        for what, target in (("ttft", 0.6), ("total", None)):
            o, b = r[f"ours_{what}_s"], r[f"mtmd_{what}_s"]
            ratio = median([x / y for x, y in zip(o, b)])
            label = "time to first token" if what == "ttft" else f"total time ({median(r['n_gen']):.0f} tokens generated)"
            rows.append(row(label, median(o), median(b), unit="s", ratio=ratio,
                            target=f"<= {target}x" if target else "", met=(ratio <= target) if target else None))
        c0 = r["ours_counters"][0] if r["ours_counters"] else {}
        notes = [f"1344x1344 picture, ctx 4096, {self.threads} threads, same Q4_K_M + f16 mmproj. llama.cpp = "
                 "`mtmd_tokenize` + `mtmd_helper_eval_chunks` (its clip encodes every chunk, then decodes), then a "
                 "greedy decode loop making as many one-token decodes as ours asks for; ours = `MiniCPMV.chat` "
                 "(stream=True, vision dtype auto), one pixel changed per run so no encoding is reused; preprocessing "
                 "included on both sides; the side that goes first alternates from run to run.",
                 f"{len(r['ours_ttft_s'])} runs after a warm-up with a 448x448 picture; mtmd prompt tokens "
                 f"{r['mtmd_n_tokens'][:1]}, ours {c0.get('prompt_tokens')} (ours adds `<image_id>0</image_id>` as the reference does).",
                 f"per-run TTFT: ours {fmt_list(r['ours_ttft_s'])} s, mtmd {fmt_list(r['mtmd_ttft_s'])} s."]
        if c0.get("vision_slots"):
            notes.append(f"ours, first run: vision {c0['vision_ms_total'] / 1e3:.1f} s for {c0['vision_slots']} slices "
                         f"({c0['vision_ms_total'] / 1e3 / c0['vision_slots']:.2f} s each), LM prefill "
                         f"{c0.get('prefill_ms', 0) / 1e3:.1f} s for {c0.get('tokens_prefilled')} positions.")
        return {"rows": rows, "notes": notes, "raw": r}

    def sec_video(self) -> dict:
        s = self.scale
        m = self.worker("video", {"lm": str(self.lm), "mmproj": str(self.mmproj), "video": str(self.video()),
                                  "threads": self.threads, "fps": 5, "packing": 3, "subset": s.video_subset,
                                  "n_ctx": 4096})
        r = m.result
        k = r["subset_frames"] / r["n_frames"]
        scale = 1 / k
        ov, mv = r.get("ours_subset_vision_s"), r["mtmd_subset_vision_s"]
        ot, mt_ = r["ours_tokens"], r["mtmd_tokens"]
        # scaled: vision linearly in frames, prefill linearly in prompt tokens (a lower bound: attention
        # grows with the context, which penalises the 3x longer one-frame-per-image prompt more)
        o_pre = r["ours_subset_ttft_s"] - (ov or 0)
        m_pre = r["mtmd_subset_ttft_s"] - mv
        o_ttft = (ov or 0) * scale + o_pre * ((ot or r["ours_subset_tokens"] * scale) / r["ours_subset_tokens"])
        m_ttft = mv * scale + m_pre * (mt_ / r["mtmd_subset_tokens"])
        rows = [
            row("language-model tokens, whole video", ot, mt_, unit="tok", note="exact"),
            row("vision time, whole video", ov * scale if ov is not None else None, mv * scale, unit="s",
                note=f"scaled from {r['subset_frames']} frames"),
            row("time to first token, whole video", o_ttft, m_ttft, unit="s", note="estimated"),
            row(f"time to first token, first {r['subset_frames']} frames", r["ours_subset_ttft_s"],
                r["mtmd_subset_ttft_s"], unit="s", note="measured"),
            row(f"language-model tokens, first {r['subset_frames']} frames", r["ours_subset_tokens"],
                r["mtmd_subset_tokens"], unit="tok"),
        ]
        notes = [f"synthetic 60 s video (moving shapes, 10 fps, 448x252), sampled as the model card does at fps 5 with "
                 f"packing 3: {r['n_frames']} frames in {r['n_groups']} groups (decoding took {r['decode_s']:.1f} s, "
                 "not counted). Ours: `load_video` + `MiniCPMV.chat(use_image_id=False, max_slice_nums=1, "
                 "temporal_ids=...)`, one 64-token slot per group. llama.cpp way: every frame its own image (mtmd "
                 "has no temporal packing for this projector): `mtmd_tokenize` with one marker per frame, "
                 "`mtmd_encode_chunk` + `mtmd_helper_decode_image_chunk` per chunk.",
                 f"Measured on the first {r['subset_frames']} frames ({r['subset_groups']} groups) with one generated "
                 "token, once, after a one-frame warm-up on both sides; whole-video vision time scaled by frames, prefill by prompt tokens (a lower bound for both, "
                 "more so for the longer one-frame-per-image prompt). The whole video at full size would take far "
                 "beyond the 60-minute budget on this machine (every frame is a ~1 TFLOP vision pass).",
                 f"one frame per image needs {mt_} tokens: more than a 4096 (or 8192/16384) context holds." if mt_ and mt_ > 4096 else "",
                 f"ours counters (subset): {r.get('ours_subset_counters')}."]
        return {"rows": rows, "notes": [n for n in notes if n], "raw": r}

    def sec_lowbit(self) -> dict:
        from .lowbit import section
        return section(self)

    def sec_sizes(self) -> dict:
        s = self.scale
        for label, p in (("synthetic bf16 checkpoint (safetensors)", self.ckpt),
                         ("Q4_K_M LM GGUF, ours (one pass)", self.lm), ("f16 mmproj GGUF", self.mmproj)):
            if p.exists():
                self.sizes.setdefault(label, dir_bytes(p))
        z = {k: v / GB for k, v in self.sizes.items()}
        rows = [row("size: synthetic bf16 checkpoint (safetensors, input of both)", z.get("synthetic bf16 checkpoint (safetensors)"), None, unit="GB"),
                row("size: BF16 LM GGUF (two-step intermediate)", None, z.get("BF16 LM GGUF (two-step intermediate)"), unit="GB"),
                row("size: Q4_K_M LM GGUF", z.get("Q4_K_M LM GGUF, ours (one pass)"),
                    z.get("Q4_K_M LM GGUF, llama_model_quantize"), unit="GB"),
                row("size: f16 mmproj GGUF", z.get("f16 mmproj GGUF"), None, unit="GB",
                    note="same file used by both sides")]
        notes = []
        image = self.image()
        cli = cli_command()
        rss_ours = None
        if cli is None:
            notes.append("minicpm-run: not run (minicpmv.cli.run is not available)")
        else:
            cmd = cli + [str(image), "What is in the image?", "--model", str(self.lm), "--mmproj", str(self.mmproj),
                         "--ctx", "4096", "--threads", str(self.threads), "--max-tokens", str(s.e2e_gen), "--json"]
            rc, wall, rss_ours = self.step("sizes:minicpm-run", run_cmd, cmd, log=self.log)
            if rc != 0:
                notes.append(f"minicpm-run failed (exit {rc}); log {self.log}: {log_tail(self.log, 3).strip()}")
                rss_ours = None
            else:
                notes.append(f"minicpm-run wall time {wall:.1f} s (load + encode + prefill + {s.e2e_gen} tokens).")
        m = self.worker("e2e", {"lm": str(self.lm), "mmproj": str(self.mmproj), "image": str(image),
                                "threads": self.threads, "runs": 1, "n_gen": s.e2e_gen, "n_ctx": 4096,
                                "warmup": 0, "sides": ["mtmd"]})
        rows.append(row("peak RSS, 1344x1344 question, Q4_K_M + f16 mmproj, ctx 4096", rss_ours, m.peak_rss_gb,
                        unit="GB", target="ours <= 7 GB", met=(rss_ours <= 7.0) if rss_ours is not None else None))
        try:
            mem = self.worker("rss_after_load", {"lm": str(self.lm), "mmproj": str(self.mmproj),
                                                 "threads": self.threads, "n_ctx": 4096}).result
            notes.append(f"ours right after `MiniCPMV.load` (ctx 4096, before any inference): resident "
                         f"{mem['VmRSS']:.2f} GB = {mem['RssAnon']:.2f} GB anonymous (vision weights "
                         f"{mem['vision_weights_gb']:.2f} GB, llama.cpp's buffers, KV cache) + {mem['RssFile']:.2f} GB of "
                         f"mmapped files (the LM GGUF {self.lm.stat().st_size / GB:.2f} GB).")
        except (BenchError, Skip) as e:
            notes.append(f"memory breakdown after load: not measured ({str(e).splitlines()[0]})")
        notes.append("llama.cpp figure: llama-mtmd-cli cannot be built from llama-cpp-python's sources here, so its "
                     "pipeline (`mtmd_tokenize` + `mtmd_helper_eval_chunks` + decode loop, same files, ctx 4096, "
                     "same threads) runs in a subprocess and its peak RSS is reported; llama-mtmd-cli itself "
                     "peaks near 10 GB on this job. Peak RSS = the subprocess's ru_maxrss (os.wait4).")
        return {"rows": rows, "notes": notes, "raw": {"sizes": self.sizes, "mtmd_subprocess": vars_m(m)}}

    # ------------------------------------------------------------------ driver

    def run(self, sections: list[str], on_section=None) -> dict:
        s = self.scale
        self.plan = list(sections)
        self.t_start = time.perf_counter()
        est = estimate(self, sections)
        print(f"bench: scale {s.name}, {self.threads} threads, runs {self.runs}; sections {', '.join(sections)}; "
              f"estimated {est / 60:.0f} min"
              + (f" (repetitions are cut to fit {self.budget_s / 60:.0f} min)" if self.budget_s else "")
              + f"; log {self.log}", file=sys.stderr)
        self.check_disk(sections)
        res = {"scale": s.name, "threads": self.threads, "runs": self.runs, "argv": " ".join(sys.argv[1:]),
               "started": now(), "machine": machine_info(), "sections": {}, "log": str(self.log)}
        mon = threading.Thread(target=self._monitor, daemon=True)
        mon.start()
        t0 = time.perf_counter()
        self.bar = tqdm(total=est, unit="s", desc="bench", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        try:
            self.step("checkpoint", self.make_ckpt)
            self.sizes["synthetic bf16 checkpoint (safetensors)"] = dir_bytes(self.ckpt)
            model_notes: list[str] = []
            for name in sections:
                if name != "conversion" and not self.models_ready():
                    try:
                        model_notes = self.step("models", self.make_models)
                    except (BenchError, Skip) as e:
                        res["sections"][name] = {"status": f"no model files: {str(e).splitlines()[0]}"}
                        continue
                fn = getattr(self, f"sec_{name}")
                t_sec = time.time()
                try:
                    sec = fn()
                    sec["status"] = "ok"
                    if name != "conversion":
                        sec["notes"] = model_notes + sec["notes"]
                except Skip as e:
                    sec = {"status": str(e)}
                except BenchError as e:
                    lines = str(e).splitlines()
                    sec = {"status": f"failed: {lines[0]} ({lines[-1].strip() if len(lines) > 1 else ''})",
                           "error": str(e)}
                sec["finished"] = now()
                sec["load"] = section_load(self.loads, t_sec)
                if sec.get("notes") is not None and sec["load"]:
                    sec["notes"].append(f"1-min load average during this section: mean {sec['load']['mean']:.2f}, "
                                        f"max {sec['load']['max']:.2f} on {self.threads} threads"
                                        + (" (other processes were competing for the CPU)"
                                           if sec["load"]["max"] > self.threads + 1.0 else ""))
                res["sections"][name] = sec
                if on_section is not None:
                    res["in_progress"] = True
                    on_section(res)
                    res.pop("in_progress")
                tqdm.write(f"bench: {name}: {sec['status'] if sec['status'] != 'ok' else summary(sec)}", file=sys.stderr)
        finally:
            self.bar.close()
            self._stop.set()
        res["finished"] = now()
        res["elapsed_min"] = (time.perf_counter() - t0) / 60
        res["load"] = self.loads
        res["load_note"] = load_note(self.loads, self.threads)
        return res


# --------------------------------------------------------------------------- small helpers

def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_list(xs) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def vars_m(m) -> dict:
    return {"result": m.result, "wall_s": m.wall_s, "peak_rss_gb": m.peak_rss_gb}


def summary(sec: dict) -> str:
    parts = []
    for r in sec["rows"]:
        if r["ratio"] is not None:
            parts.append(f"{r['metric']}: {r['ratio']:.3g}x" + ("" if r["met"] is None else (" ok" if r["met"] else " MISSED")))
    return "; ".join(parts) or "done"


def section_load(loads: list[tuple[float, float]], since: float) -> dict | None:
    vals = [l for t, l in loads if t >= since]
    return {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else None


def load_note(loads: list[tuple[float, float]], threads: int) -> str:
    if not loads:
        return "not sampled"
    vals = [l for _, l in loads]
    mx, mean = max(vals), sum(vals) / len(vals)
    note = f"1-min load average during the run: mean {mean:.2f}, max {mx:.2f} (the benchmark itself uses {threads})"
    if mx > threads + 1.0:
        note += "; other processes competed for the CPU during part of the run"
    return note


def compare_tensors(a: Path, b: Path) -> str:
    """Whether two GGUFs hold the same tensors with the same types and bytes."""
    import gguf
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if set(ta) != set(tb):
        return f"different tensor names ({len(set(ta) ^ set(tb))} differ)"
    bad = [n for n in ta if ta[n].tensor_type != tb[n].tensor_type
           or hashlib.sha1(ta[n].data.tobytes()).digest() != hashlib.sha1(tb[n].data.tobytes()).digest()]
    if bad:
        return f"{len(bad)} of {len(ta)} tensors differ (first: {bad[0]})"
    return f"identical types and bytes for all {len(ta)} tensors"


def cli_command() -> list[str] | None:
    try:
        import minicpmv.cli.run  # noqa: F401
    except ImportError:
        return None
    exe = shutil.which("minicpm-run")
    return [exe] if exe else [sys.executable, "-c", "import sys; from minicpmv.cli.run import main; sys.exit(main())"]


def estimate(b: Bench, sections: list[str]) -> float:
    e = b.scale.est
    total = 0.0 if b.ckpt_ready() else e["checkpoint"]
    if "conversion" in sections:
        total += e["convert_onepass"] + e["convert_bf16"] + e["llama_quantize"] + e["compare"]
    elif not b.models_ready():
        total += e["models"]
    f = b.runs / b.scale.runs
    for s in sections:
        if s in ("vision", "llm"):
            total += e[s] * f
        elif s == "e2e":
            total += e[s] * b.e2e_runs / b.scale.e2e_runs
        elif s in ("video", "sizes", "lowbit"):
            total += e[s]
    return total


def closing(res: dict) -> list[str]:
    """One line per target: the figure, the target, met or missed and by how much."""
    out = []
    for key, sec in res["sections"].items():
        if sec.get("status") != "ok":
            out.append(f"{key}: not run ({sec.get('status')})")
            continue
        for r in sec["rows"]:
            if r["met"] is None:
                continue
            if "RSS" in r["metric"]:
                val = f"{r['ours']:.3g} {r['unit']}" + (f" (llama.cpp {r['llama']:.3g} {r['unit']})" if r["llama"] else "")
            else:
                val = f"{r['ratio']:.3g}x (ours {r['ours']:.4g} {r['unit']}, llama.cpp {r['llama']:.4g} {r['unit']})"
            verdict = "met" if r["met"] else "MISSED"
            if not r["met"] and r["ratio"] is not None and "x" in r["target"] and "RSS" not in r["metric"]:
                import re
                lim = float(re.findall(r"[0-9.]+", r["target"])[0])
                verdict += f" (the ratio is {r['ratio'] / lim:.2f}x the target's {lim:g}x)"
            out.append(f"{key}: {r['metric']}: {val}; target {r['target']}: {verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None,
                    help=f"comma-separated sections to run (default: all): {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: usable cores)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per figure (default: 3; 2 for e2e at full)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for BENCHMARKS.md and results.json (default: the repo for --scale full, "
                         "the cache folder otherwise)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="cut repetitions so the run fits in this many minutes (default: 60 at full scale, none at medium)")
    ap.add_argument("--prepare", action="store_true",
                    help="only generate the cached synthetic checkpoint and our Q4_K_M + f16 mmproj files, untimed")
    args = ap.parse_args(argv)
    if args.budget_min is None and args.scale == "full":
        args.budget_min = 60.0
    if args.threads is None:
        from .common import machine_info as _mi
        args.threads = _mi()["usable_cpus"] or 1
    sections = SECTIONS if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {bad[0]!r}; valid: {', '.join(SECTIONS)}")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be >= 1")
    b = Bench(args)
    if args.prepare:
        b.check_disk(["models"])
        b.make_ckpt()
        notes = b.make_models()
        print(f"bench: ready: {b.ckpt}, {b.lm}, {b.mmproj}" + (f" ({notes[0]})" if notes else ""), file=sys.stderr)
        return 0
    if args.out is None:
        md, js = (REPO / "BENCHMARKS.md", REPO / "bench" / "results.json") if args.scale == "full" else \
            (b.cache / f"{args.scale}-results" / "BENCHMARKS.md", b.cache / f"{args.scale}-results" / "results.json")
    else:
        md, js = args.out / "BENCHMARKS.md", args.out / "results.json"
    old: dict = {}
    if js.is_file():
        import json
        try:
            old = json.loads(js.read_text())
        except (ValueError, OSError):
            old = {}

    def save(res: dict) -> None:
        """Write the report (after every section, so a late failure keeps the earlier figures);
        sections of an earlier run of the same scale that this run does not redo are kept."""
        out = dict(res)
        secs = dict(res["sections"])
        if old.get("scale") == res["scale"]:
            for k, v in old.get("sections", {}).items():
                if k not in secs and k not in b.plan:
                    v = dict(v)
                    v["notes"] = list(v.get("notes", [])) + [f"(from an earlier run, finished {v.get('finished', '?')})"]
                    secs[k] = v
        out["sections"] = {k: secs[k] for k in SECTIONS if k in secs}
        out["closing"] = closing(out)
        report.write(out, md, js)
        res["closing"] = out["closing"]

    res = b.run(sections, on_section=save)
    save(res)
    print(f"bench: wrote {md} and {js} ({res['elapsed_min']:.1f} min)", file=sys.stderr)
    for c in res["closing"]:
        print(f"  {c}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
