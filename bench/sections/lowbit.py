"""§6 of `make bench`: the low-bit types with no importance matrix, a text matrix and an image
matrix (minicpm-imatrix): size of the language model, and first-token KL divergence from F16 on
held-out image prompts.

Steps, every measured one in its own worker process: our F16 LM GGUF; a text matrix (plain text
lines, as llama-imatrix uses) and an image matrix (picture questions) computed with
minicpm-imatrix on it; F16's first-token logits on the held-out prompts; then per type and matrix a
one-pass conversion (LM only), its first-token logits on the same prompts, and the file deleted.
KL(P_F16 || P_quant) of the next-token distribution after each prompt, in nats, mean over prompts.
All runs use an f32 KV cache without flash attention and the f32 vision encoder, so the F16
reference is exact and the only difference between runs is the language model's weights.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import GB, Skip, free_bytes, loadavg, now
from ..session import Session

TYPES = ("Q2_K", "Q3_K_M", "IQ3_M", "IQ2_M")
MATRICES = ("none", "text", "image")
QUESTIONS = (
    "What is in the image?",
    "Describe the shapes and their colours.",
    "How many shapes are there?",
    "Which colour covers the largest area?",
    "Is there a circle in the picture? Where?",
    "Describe the background.",
    "What is at the top left?",
    "Summarise the picture in one sentence.",
)
CTX = 1024  # the longest calibration prompt (a 1008x756 picture: 10 slots) is ~680 positions


@dataclass(frozen=True)
class Plan:
    n_cal_images: int  # image-matrix calibration items (pictures of various sizes)
    n_cal_text: int  # text-matrix calibration items (plain text lines)
    text_words: int  # words per text line
    n_eval: int  # held-out image prompts for the KL
    eval_size: int  # side of the held-out pictures (672: overview + 4 slices = 320 image positions)
    disk_gb: float  # F16 LM + one quantized LM + inputs


PLANS = {"full": Plan(16, 16, 300, 8, 672, 22.0), "medium": Plan(3, 3, 120, 3, 672, 0.2)}


# --------------------------------------------------------------------------- parent side


def run(b: Session) -> dict:
    """Run the section; returns {"rows", "table", "notes", "raw"}.

    At full scale this takes hours, so it resumes: every finished step's result is kept in
    `lowbit/state.json` with its files (matrices, logits), and a later `--only lowbit` with the same
    plan, checkpoint and mmproj goes on from the first unfinished step (a changed plan or input
    starts over)."""
    plan = PLANS[b.scale.name]
    work = b.work / "lowbit"
    ident = {
        "plan": plan.__dict__,
        "ckpt": _identity(b.ckpt / "model.safetensors.index.json"),
        "mmproj": _identity(b.mmproj),
        "types": TYPES,
        "matrices": MATRICES,
    }
    state = _load_state(work, ident)
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"ident": ident, "steps": {}}
    steps: dict = state["steps"]
    free = free_bytes(work) / GB
    if free < plan.disk_gb and "F16 logits" not in steps:
        raise Skip(
            f"not enough free disk in {work}: need about {plan.disk_gb:.0f} GB (F16 language model + one "
            f"quantized copy), have {free:.1f} GB"
        )
    T = b.threads
    started = now()  # steps finished before this are an earlier run's
    n_steps = 4 + 2 * len(TYPES) * len(MATRICES)
    step = b.scale.est.get("lowbit", 0) / n_steps

    def once(key: str, task: str, args: dict) -> dict:
        """The result of step `key`: kept from an earlier run, or computed now and kept."""
        if key not in steps:
            r = b.worker(task, args)
            steps[key] = {"result": r.result, "finished": now(), "wall_s": r.wall_s, "loadavg_1min": loadavg()[0]}
            _save_state(work, state)
        if b.bar is not None:  # the section's estimate, spread over its steps
            b.bar.update(step)
        return steps[key]["result"]

    from minicpmv.convert.pipeline import lm_file_name

    f16_lm = work / "F16" / lm_file_name("F16")
    _remove_models(work, keep=f16_lm)  # what an interrupted run left (a killed conversion's partial file)
    try:
        cal_text, cal_image, prompts = make_inputs(work, plan)
        vision = work / "vision-embeddings.npz"  # the same mmproj and pictures in every logits run
        if "F16 logits" not in steps:
            if not f16_lm.is_file():
                steps.pop("F16 convert", None)
            once(
                "F16 convert",
                "lowbit_convert",
                {"ckpt": str(b.ckpt), "out": str(f16_lm.parent), "type": "F16", "threads": T},
            )
        matrices, seconds = {"none": None}, {}
        for name, cal in (("text", cal_text), ("image", cal_image)):
            out = work / f"imatrix-{name}.gguf"
            if not out.is_file():
                steps.pop(f"imatrix {name}", None)
            m = once(
                f"imatrix {name}",
                "lowbit_imatrix",
                {"lm": str(f16_lm), "mmproj": str(b.mmproj), "cal": str(cal), "out": str(out), "threads": T},
            )
            matrices[name], seconds[f"imatrix {name}"] = str(out), m["seconds"]
        once(
            "F16 logits",
            "lowbit_logits",
            {
                "lm": str(f16_lm),
                "mmproj": str(b.mmproj),
                "prompts": str(prompts),
                "out": str(work / "F16.npy"),
                "vision": str(vision),
                "threads": T,
            },
        )
        f16_lm.unlink(missing_ok=True)
        ref = np.load(work / "F16.npy")
        results: dict[str, dict] = {}
        for t in TYPES:
            for mname in MATRICES:
                key = f"{t}/{mname}"
                stem = key.replace("/", "-")
                if f"{key} logits" not in steps:  # the quantized file is made again if it is gone
                    steps.pop(f"{key} convert", None)
                c = once(
                    f"{key} convert",
                    "lowbit_convert",
                    {"ckpt": str(b.ckpt), "out": str(work / stem), "type": t, "imatrix": matrices[mname], "threads": T},
                )
                if "refused" in c:
                    results[key] = c
                    continue
                once(
                    f"{key} logits",
                    "lowbit_logits",
                    {
                        "lm": c["lm"],
                        "mmproj": str(b.mmproj),
                        "prompts": str(prompts),
                        "out": str(work / f"{stem}.npy"),
                        "vision": str(vision),
                        "threads": T,
                    },
                )
                results[key] = {
                    "bytes": c["bytes"],
                    "bpw": c["bpw"],
                    "seconds": c["seconds"],
                    **kl(ref, np.load(work / f"{stem}.npy")),
                }
                shutil.rmtree(work / stem, ignore_errors=True)
    finally:
        _remove_models(work, keep=f16_lm)
    kept = sorted(v["finished"] for v in steps.values() if v["finished"] < started)
    return report(results, seconds, plan, b.scale.name, kept, len(steps))


def _remove_models(work: Path, keep: Path) -> None:
    """Delete the quantized models (and partial files) of unfinished steps; the F16 one is kept
    until its last use."""
    for p in work.glob("*/*.gguf"):  # pathlib's * also matches the converter's hidden partial files
        if p != keep:
            p.unlink()


def _identity(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _load_state(work: Path, ident: dict) -> dict | None:
    try:
        state = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("ident") == json.loads(json.dumps(ident)) else None


def _save_state(work: Path, state: dict) -> None:
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(work / "state.json")


def kl(ref: np.ndarray, q: np.ndarray) -> dict:
    """KL(P_ref || P_q) of each row's softmax (nats) and top-1 agreement."""
    lp = _log_softmax(ref.astype(np.float64))
    lq = _log_softmax(q.astype(np.float64))
    per = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "kl_mean": float(per.mean()),
        "kl_max": float(per.max()),
        "top1_same": float((ref.argmax(-1) == q.argmax(-1)).mean()),
        "kl": per.tolist(),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_inputs(work: Path, plan: Plan) -> tuple[Path, Path, Path]:
    """Calibration sets (text lines, picture questions) and held-out prompts, all deterministic."""
    from ..media import picture

    rng = np.random.default_rng(15)
    vocab = (
        "the model reads a long document about rivers mountains cities weather music history science "
        "gardens machines languages numbers colours animals stories markets travel and then it writes "
        "a short answer with care"
    ).split()
    text = work / "calibration-text.txt"
    text.write_text(
        "\n".join(
            " ".join(vocab[i] for i in rng.integers(0, len(vocab), plan.text_words)).capitalize() + "."
            for _ in range(plan.n_cal_text)
        )
        + "\n"
    )
    cal_dir = work / "calibration-images"
    cal_dir.mkdir(exist_ok=True)
    sizes = [(448, 448), (896, 448), (672, 672), (448, 896), (1008, 756), (560, 420)]
    rows = []
    for i in range(plan.n_cal_images):
        w, h = sizes[i % len(sizes)]
        picture(w, h, seed=i).save(cal_dir / f"cal-{i}.png")
        rows.append(json.dumps({"image": f"calibration-images/cal-{i}.png", "text": QUESTIONS[i % len(QUESTIONS)]}))
    images = work / "calibration-images.jsonl"
    images.write_text("\n".join(rows) + "\n")
    ev = work / "eval"
    ev.mkdir(exist_ok=True)
    prompts = []
    for i in range(plan.n_eval):  # held out: other seeds than the calibration pictures
        p = ev / f"eval-{i}.png"
        picture(plan.eval_size, plan.eval_size, seed=1000 + i).save(p)
        prompts.append({"image": str(p), "text": QUESTIONS[(i + 3) % len(QUESTIONS)]})
    path = work / "eval-prompts.json"
    path.write_text(json.dumps(prompts))
    return text, images, path


def report(results: dict, seconds: dict, plan: Plan, scale: str, kept: list[str], n_done: int) -> dict:
    def cell(key: str) -> str:
        r = results[key]
        if r.get("refused"):
            return "refused (needs a matrix)"
        return f"{r['kl_mean']:.4f} (top-1 {r['top1_same'] * 100:.0f}%)"

    table = [
        "| type | LM size | bits/weight | KL, no matrix | KL, text matrix | KL, image matrix |",
        "|---|---|---|---|---|---|",
    ]
    for t in TYPES:
        any_r = next(results[f"{t}/{m}"] for m in MATRICES if not results[f"{t}/{m}"].get("refused"))
        table.append(
            f"| {t} | {any_r['bytes'] / GB:.3g} GB | {any_r['bpw']:.2f} | "
            + " | ".join(cell(f"{t}/{m}") for m in MATRICES)
            + " |"
        )
    notes = [
        "**Synthetic weights say little about real quality**: the checkpoint's weights are random and the "
        "pictures are generated shapes, so these divergences only show that the pipeline works and which way the "
        'matrices move the numbers. To judge a type, rerun `make bench BENCH_ARGS="--only lowbit"` with the '
        "real checkpoint in place of the synthetic one (`.cache/bench/full-ckpt`, marked ready by a `.complete` "
        "file), or quantize with `minicpm-imatrix` on your own images and compare on your prompts.",
        f"KL(P_F16 || P_type) of the next-token distribution after each of {plan.n_eval} held-out image prompts "
        f"({plan.eval_size}x{plan.eval_size} pictures: overview + slices, a question), in nats, mean over prompts; "
        "top-1 = how often the most likely token is F16's. Same f16 mmproj, f32 vision, f32 KV cache without "
        "flash attention for every model, so only the language model's weights differ.",
        f"Matrices from minicpm-imatrix on our F16 GGUF: text = {plan.n_cal_text} plain text lines of "
        f"{plan.text_words} random words (as llama-imatrix runs a text file), {seconds.get('imatrix text', 0):.0f} s; "
        f"image = {plan.n_cal_images} picture questions (other pictures than the held-out ones), "
        f"{seconds.get('imatrix image', 0):.0f} s."
        + "".join(
            f" {k.split('/')[0]} cannot be made without a matrix (llama-quantize refuses it too)."
            for k, r in results.items()
            if r.get("refused")
        ),
        "Sizes: the LM GGUF file; bits/weight = tensor bytes x 8 / parameters. One-pass conversion seconds: "
        + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in results.items() if "seconds" in v)
        + ".",
    ]
    if kept:
        notes.append(
            f"Resumed: {len(kept)} of the {n_done} steps were kept from earlier runs (finished {kept[0]} to "
            f"{kept[-1]}); each step's seconds are those of the run that made it."
        )
    if scale != "full":
        notes.insert(0, f"scale {scale}: a harness check, not a measurement.")
    return {"rows": [], "table": table, "notes": notes, "raw": {"results": results, "seconds": seconds}}


# --------------------------------------------------------------------------- worker side (bench.worker)


def lowbit_convert(a: dict) -> dict:
    from minicpmv.convert.pipeline import convert
    from minicpmv.gguf_info import read_gguf_info

    t0 = time.perf_counter()
    try:
        r = convert(
            Path(a["ckpt"]),
            Path(a["out"]),
            quant_type=a["type"],
            imatrix=a.get("imatrix"),
            threads=a.get("threads"),
            progress=False,
            force=True,
            write_mmproj=False,
        )
    except ValueError as e:
        if "needs an importance matrix" in str(e):  # llama-quantize's refusal, as the CLI reports it
            return {"refused": str(e)}
        raise
    sec = time.perf_counter() - t0
    tensors = read_gguf_info(r.lm_path).tensors.values()
    nbytes = sum(t.nbytes for t in tensors)
    n = sum(t.n_elements for t in tensors)
    return {"seconds": sec, "lm": str(r.lm_path), "bytes": r.lm_path.stat().st_size, "bpw": 8 * nbytes / n}


def lowbit_imatrix(a: dict) -> dict:
    from minicpmv.cli.imatrix_compute import ImatrixJob, compute_imatrix

    t0 = time.perf_counter()
    res = compute_imatrix(
        ImatrixJob(
            Path(a["lm"]),
            Path(a["mmproj"]),
            Path(a["cal"]),
            Path(a["out"]),
            force=True,
            n_ctx=CTX,
            threads=a.get("threads"),
            progress=False,
        )
    )
    return {"seconds": time.perf_counter() - t0, "chunks": res.chunk_count, "entries": res.entries}


def lowbit_logits(a: dict) -> dict:
    """First-token logits after each held-out prompt. The vision embeddings are the same for every
    language model (same mmproj, pictures and f32 encoder): the first run saves them to `vision`,
    later runs put them in the model's embedding cache instead of encoding again."""
    from minicpmv.runtime import MiniCPMV

    prompts = json.loads(Path(a["prompts"]).read_text())
    model = MiniCPMV.load(
        a["lm"], a["mmproj"], n_ctx=CTX, n_threads=a.get("threads"), vision_dtype="f32", kv_type="f32", flash_attn=False
    )
    vision = Path(a["vision"])
    if vision.is_file():
        with np.load(vision) as z:
            for k in z.files:
                model.vision_cache.add(bytes.fromhex(k), z[k])
    rows = []
    t0 = time.perf_counter()
    for p in prompts:
        model.reset()
        rows.append(model.prefill([{"role": "user", "content": [Path(p["image"]), p["text"]]}]))
    np.save(a["out"], np.stack(rows).astype(np.float32))
    if not vision.is_file():
        tmp = vision.with_suffix(".tmp.npz")
        np.savez(tmp, **{k.hex(): e for k, e in model.vision_cache.items()})
        tmp.replace(vision)
    encoded = model.stats.slots_encoded
    model.close()
    return {"seconds": time.perf_counter() - t0, "slots_encoded_last_prompt": encoded}


TASKS = {f.__name__: f for f in (lowbit_convert, lowbit_imatrix, lowbit_logits)}
