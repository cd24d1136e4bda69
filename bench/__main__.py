"""`make bench`: every figure of BENCHMARKS.md, ours vs llama.cpp, in one run.

    python -m bench [--only conversion,vision,llm,buffers,e2e,video,serve,parallel,sizes,memory,lowbit] [--threads N]
                        [--scale full|medium] [--runs N] [--budget-min M] [--out DIR] [--prepare]

The full-size synthetic checkpoint (~17.4 GB bf16) is generated once into the cache folder
(.cache/bench, or $MINICPMV_BENCH_CACHE); `--prepare` only does that (and converts our Q4_K_M +
f16 mmproj, untimed). Every measured step runs in its own subprocess (bench.worker) so its peak
RSS is its own. Repetitions are cut when the next one would not leave time for the remaining
sections within --budget-min (60 at full scale). `--scale medium` checks the whole harness in a
few minutes and writes its report under the cache folder, not into the repository.

Layout: this driver; bench/session.py (scale, budget, cached inputs); bench/sections/ (one module
per section: the figures and the measurement behind them); bench/worker.py (the measuring
subprocess); bench/report.py (BENCHMARKS.md and results.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import report
from .common import REPO, BenchError, Skip, dir_bytes, machine_info, now
from .sections import DEFAULT, SECTIONS
from .session import SCALES, Session


def section_load(loads: list[tuple[float, float]], since: float) -> dict | None:
    vals = [load for t, load in loads if t >= since]
    return {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else None


def load_note(loads: list[tuple[float, float]], threads: int) -> str:
    if not loads:
        return "not sampled"
    vals = [load for _, load in loads]
    mx, mean = max(vals), sum(vals) / len(vals)
    note = f"1-min load average during the run: mean {mean:.2f}, max {mx:.2f} (the benchmark itself uses {threads})"
    if mx > threads + 1.0:
        note += "; other processes competed for the CPU during part of the run"
    return note


def run_section(bench: Session, name: str, model_notes: list[str]) -> dict:
    """One section's rows and notes, or its status when it could not run."""
    t_sec = time.time()
    try:
        sec = SECTIONS[name].run(bench)
        sec["status"] = "ok"
        if name != "conversion":
            sec["notes"] = model_notes + sec["notes"]
    except Skip as e:
        sec = {"status": str(e)}
    except BenchError as e:
        lines = str(e).splitlines()
        sec = {"status": f"failed: {lines[0]} ({lines[-1].strip() if len(lines) > 1 else ''})", "error": str(e)}
    sec["finished"] = now()
    sec["load"] = section_load(bench.loads, t_sec)
    if sec.get("notes") is not None and sec["load"]:
        sec["notes"].append(
            f"1-min load average during this section: mean {sec['load']['mean']:.2f}, "
            f"max {sec['load']['max']:.2f} on {bench.threads} threads"
            + (" (other processes were competing for the CPU)" if sec["load"]["max"] > bench.threads + 1.0 else "")
        )
    return sec


def run(bench: Session, sections: list[str], on_section=None) -> dict:
    s = bench.scale
    bench.plan = list(sections)
    bench.t_start = time.perf_counter()
    est = bench.estimate(sections)
    print(
        f"bench: scale {s.name}, {bench.threads} threads, runs {bench.runs}; sections {', '.join(sections)}; "
        f"estimated {est / 60:.0f} min"
        + (f" (repetitions are cut to fit {bench.budget_s / 60:.0f} min)" if bench.budget_s else "")
        + f"; log {bench.log}",
        file=sys.stderr,
    )
    bench.check_disk(sections)
    res = {
        "scale": s.name,
        "threads": bench.threads,
        "runs": bench.runs,
        "argv": " ".join(sys.argv[1:]),
        "started": now(),
        "machine": machine_info(),
        "sections": {},
        "log": str(bench.log),
    }
    bench.start_monitor()
    t0 = time.perf_counter()
    bench.bar = tqdm(total=est, unit="s", desc="bench", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    try:
        bench.step("checkpoint", bench.make_ckpt)
        bench.sizes["synthetic bf16 checkpoint (safetensors)"] = dir_bytes(bench.ckpt)
        model_notes: list[str] = []
        for name in sections:
            if name != "conversion" and not bench.models_ready():
                try:
                    model_notes = bench.step("models", bench.make_models)
                except (BenchError, Skip) as e:
                    res["sections"][name] = {"status": f"no model files: {str(e).splitlines()[0]}"}
                    continue
            sec = run_section(bench, name, model_notes)
            res["sections"][name] = sec
            if on_section is not None:
                res["in_progress"] = True
                on_section(res)
                res.pop("in_progress")
            tqdm.write(
                f"bench: {name}: {sec['status'] if sec['status'] != 'ok' else report.summary(sec)}", file=sys.stderr
            )
    finally:
        bench.bar.close()
        bench.stop_monitor()
    res["finished"] = now()
    res["elapsed_min"] = (time.perf_counter() - t0) / 60
    res["load"] = bench.loads
    res["load_note"] = load_note(bench.loads, bench.threads)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated sections to run (default: all but lowbit, which takes hours and resumes where an "
        f"earlier run stopped): {', '.join(SECTIONS)}",
    )
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: usable cores)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per figure (default: 3; 2 for e2e at full)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for BENCHMARKS.md and results.json (default: the repo for --scale full, "
        "the cache folder otherwise)",
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="cut repetitions so the run fits in this many minutes (default: 60 at full scale, none at medium)",
    )
    ap.add_argument(
        "--prepare",
        action="store_true",
        help="only generate the cached synthetic checkpoint and our Q4_K_M + f16 mmproj files, untimed",
    )
    args = ap.parse_args(argv)
    if args.budget_min is None and args.scale == "full":
        args.budget_min = 60.0
    if args.threads is None:
        args.threads = machine_info()["usable_cpus"] or 1
    sections = list(DEFAULT) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {bad[0]!r}; valid: {', '.join(SECTIONS)}")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be >= 1")
    bench = Session(args)
    if args.prepare:
        bench.check_disk(["models"])
        bench.make_ckpt()
        notes = bench.make_models()
        print(
            f"bench: ready: {bench.ckpt}, {bench.lm}, {bench.mmproj}" + (f" ({notes[0]})" if notes else ""),
            file=sys.stderr,
        )
        return 0
    if args.out is None:
        md, js = (
            (REPO / "BENCHMARKS.md", REPO / "bench" / "results.json")
            if args.scale == "full"
            else (
                bench.cache / f"{args.scale}-results" / "BENCHMARKS.md",
                bench.cache / f"{args.scale}-results" / "results.json",
            )
        )
    else:
        md, js = args.out / "BENCHMARKS.md", args.out / "results.json"
    old: dict = {}
    if js.is_file():
        try:
            old = json.loads(js.read_text())
        except (ValueError, OSError):
            old = {}

    def save(res: dict) -> None:
        """Write the report (after every section, so a late failure keeps the earlier figures);
        sections of an earlier run of the same scale that this run does not redo are kept."""
        out = report.merged(res, old, bench.plan, list(SECTIONS))
        report.write(out, md, js)
        res["closing"] = out["runs"][out["current"]]["closing"]

    res = run(bench, sections, on_section=save)
    save(res)
    print(f"bench: wrote {md} and {js} ({res['elapsed_min']:.1f} min)", file=sys.stderr)
    for c in res["closing"]:
        print(f"  {c}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
