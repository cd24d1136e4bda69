"""One benchmark run's state: the scale, where the cached inputs live, the progress bar, the time
budget (how many repetitions still fit), and the untimed fixtures (synthetic checkpoint, our GGUF
files, the picture and the video). Sections read it; bench.run drives it."""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from minicpmv.convert.pipeline import lm_file_name, mmproj_file_name

from . import llama_server
from .common import GB, BenchError, Skip, cache_root, free_bytes, loadavg, run_worker

LM_NAME = lm_file_name("Q4_K_M")  # what `minicpm-convert` writes by default
MMPROJ_NAME = mmproj_file_name("f16")


@dataclass(frozen=True)
class Scale:
    name: str
    ckpt_gb: float  # synthetic checkpoint on disk
    bf16_gb: float  # BF16 LM GGUF (two-step intermediate)
    q4_gb: float  # one Q4_K_M LM GGUF
    mmproj_gb: float  # f16 mmproj
    runs: int  # default repetitions (vision, llm)
    e2e_runs: int
    n_prompt: int = 512
    n_gen: int = 128
    e2e_gen: int = 32  # tokens generated after the image question
    video_subset: int = 12  # frames measured (a multiple of the packing); the rest is scaled
    est: dict = field(default_factory=dict)  # seconds per step, for the estimate and the progress bar
    floor: dict = field(default_factory=dict)  # seconds a section needs at least (load, warm-up, one run)
    fixed: dict = field(default_factory=dict)  # seconds of a section spent before its measured runs


SCALES = {
    # seconds on the 2-core EPYC (AVX512-BF16) this was written on, extrapolated to an idle machine from
    # single runs made while other jobs were loading it
    "full": Scale(
        "full",
        17.4,
        16.4,
        5.0,
        1.1,
        runs=3,
        e2e_runs=2,
        video_subset=6,
        est={
            "checkpoint": 420,
            "convert_onepass": 480,
            "convert_bf16": 200,
            "llama_quantize": 480,
            "compare": 60,
            "models": 900,
            "vision": 150,
            "llm": 420,
            "buffers": 400,
            "e2e": 600,
            "video": 330,
            # serve: two server loads and warm-ups ~45 s; per run ours ~80 s (question + follow-up) and the peer
            # ~120 s, plus its follow-up once (~120 s); decode 2 x 128 tokens ~40 s; 6 video frames ~30 s
            "serve": 660,
            "serve_inproc": 70,  # load, decode 2 x 128 tokens, the video's prompt counted
            # parallel: three workers (ours ~470 s: decode with 1, 2, 4 slots, chunk sweep, vision beside 3 streams;
            # llama-server -np 1, 2, 4 ~230 s; the image TTFT twice ~130 s); the llama-server build (8.6 min on the
            # 2-core Xeon) once per cache folder
            "parallel": 840,
            "parallel_build": 600,
            "sizes": 5,
            "memory": 900,
            "lowbit": 23000,
        },
        floor={
            "vision": 100,
            "llm": 200,
            "buffers": 400,
            "e2e": 400,
            "video": 330,
            "serve": 520,
            "parallel": 840,
            "memory": 900,
        },
        # serve: the loads and warm-ups before its runs, and the decode, video and in-process worker after them
        fixed={"vision": 70, "llm": 60, "e2e": 120, "serve": 200},
    ),
    "medium": Scale(
        "medium",
        0.06,
        0.05,
        0.02,
        0.02,
        runs=3,
        e2e_runs=3,
        est={
            "checkpoint": 2,
            "convert_onepass": 5,
            "convert_bf16": 4,
            "llama_quantize": 3,
            "compare": 1,
            "models": 8,
            "vision": 10,
            "llm": 15,
            "buffers": 10,
            "e2e": 15,
            "video": 30,
            "serve": 60,
            "serve_inproc": 8,
            "parallel": 60,
            "parallel_build": 600,
            "sizes": 1,
            "memory": 40,
            "lowbit": 300,
        },
    ),
}


class Session:
    def __init__(self, args: argparse.Namespace):
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

    @property
    def lm(self) -> Path:
        return self.models / LM_NAME

    @property
    def mmproj(self) -> Path:
        return self.models / MMPROJ_NAME

    # ------------------------------------------------------------------ steps and time

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

    def llama_server(self) -> tuple[Path, dict]:
        """llama-server's binary and build facts (bench/llama_server.py): built once per cache folder
        (~20 min on 2 cores, as a step of its own), then reused; Skip names why there is none."""
        if llama_server.built(self.cache):
            return llama_server.build(self.cache, self.log, self.threads)
        return self.step("parallel_build", llama_server.build, self.cache, self.log, self.threads)

    def worker(self, task: str, args: dict, timeout: float | None = None):
        return self.step(task, run_worker, task, args, log=self.log, timeout=timeout)

    def runs_budget(self, name: str) -> float | None:
        """Seconds the measured runs of section `name` may take so that the sections after it
        still fit in --budget-min (each needs at least its floor); None = no limit."""
        if self.budget_s is None:
            return None
        left = self.budget_s - (time.perf_counter() - self.t_start)
        later = self.plan[self.plan.index(name) + 1 :] if name in self.plan else []
        return max(0.0, left - sum(self.scale.floor.get(s, 0) for s in later) - self.scale.fixed.get(name, 0))

    def estimate(self, sections: list[str]) -> float:
        e = self.scale.est
        total = 0.0 if self.ckpt_ready() else e["checkpoint"]
        if "conversion" in sections:
            total += e["convert_onepass"] + e["convert_bf16"] + e["llama_quantize"] + e["compare"]
        elif not self.models_ready():
            total += e["models"]
        f = self.runs / self.scale.runs
        for s in sections:
            if s in ("vision", "llm"):
                total += e[s] * f
            elif s == "e2e":
                total += e[s] * self.e2e_runs / self.scale.e2e_runs
            elif s == "serve":
                total += e[s] * self.e2e_runs / self.scale.e2e_runs + e["serve_inproc"]
            elif s == "parallel":
                total += e[s] + (0 if llama_server.built(self.cache) else e["parallel_build"])
            elif s in ("buffers", "video", "sizes", "memory", "lowbit"):
                total += e[s]
        return total

    def start_monitor(self) -> None:
        """Sample the 1-min load average every 5 s until `stop_monitor`."""

        def sample() -> None:
            while not self._stop.wait(5.0):
                self.loads.append((time.time(), loadavg()[0]))

        threading.Thread(target=sample, daemon=True).start()

    def stop_monitor(self) -> None:
        self._stop.set()

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
            need += s.q4_gb + s.mmproj_gb + s.bf16_gb  # fallback path may need the BF16 transiently
        return need + (2.0 if s.name == "full" else 0.1)

    def check_disk(self, sections: list[str]) -> None:
        need = self.disk_plan(sections)
        free = free_bytes(self.cache) / GB
        print(f"disk: need about {need:.1f} GB in {self.cache}, {free:.1f} GB free", file=sys.stderr)
        if free < need:
            raise SystemExit(
                f"bench: not enough free disk in {self.cache}: need about {need:.1f} GB "
                f"(checkpoint {self.scale.ckpt_gb} GB, BF16 GGUF {self.scale.bf16_gb} GB, two Q4_K_M "
                f"{self.scale.q4_gb} GB each), have {free:.1f} GB; free space or set MINICPMV_BENCH_CACHE"
            )

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
            print(
                f"bench: one-pass Q4_K_M conversion failed, falling back to llama_model_quantize: "
                f"{str(e).splitlines()[0]}",
                file=sys.stderr,
            )
        tmp = self.work / "fallback"
        self.worker("convert_bf16", {"ckpt": str(self.ckpt), "out": str(tmp), "threads": self.threads})
        bf16 = next(tmp.glob("*-BF16.gguf"))
        self.worker("llama_quantize", {"src": str(bf16), "dst": str(self.lm), "threads": self.threads})
        shutil.rmtree(tmp, ignore_errors=True)
        self.worker(
            "convert_onepass",
            {"ckpt": str(self.ckpt), "out": str(self.models), "threads": self.threads, "write_lm": False},
        )
        return [
            "the Q4_K_M language model used below was made by llama_model_quantize (our one-pass K-quant "
            "conversion was unavailable)"
        ]

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
