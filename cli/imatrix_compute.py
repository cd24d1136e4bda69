"""minicpm-imatrix's work: run the model over a calibration set and write llama.cpp's imatrix GGUF.

Every calibration item is one chunk in llama-imatrix's sense, evaluated from an empty KV cache:
image, video and chat items through the runtime's own prompt and vision path (MiniCPMV.prefill:
the reference chat template, image slicing, the torch vision encoder, embedding batches), plain
text lines as raw tokens (a line longer than the context in context-sized pieces). Every position
computes logits, as llama-imatrix asks, so the last layer sees all positions. The eval callback
(imatrix_collect) sums the squared inputs of every `blk.*` matmul weight.

The file follows imatrix.cpp: `imatrix.datasets` = the calibration sets used (appending adds one),
`imatrix.chunk_count` = chunks (items) evaluated in total, `imatrix.chunk_size` = the context size
(the longest a chunk can be; llama-imatrix writes its fixed chunk length there). It is rewritten
(atomically) after every item, so an interrupted run keeps what it computed; `append` adds a run's
sums and counts to an existing matrix and, on the same calibration set, resumes after the items
it already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minicpmv.quant.imatrix import ImatrixSums, read_imatrix_sums, write_imatrix
from minicpmv.quant.imatrix_collect import ImatrixCollector, Stats

from .calibration import Item, read_calibration


@dataclass
class ImatrixJob:
    lm: Path  # language-model GGUF (F16/BF16/F32 or quantized)
    mmproj: Path | None  # needed when the calibration set has images or videos
    calibration: Path  # folder of images/videos, or JSONL
    out: Path
    chunk: int | None = None  # first item to process (None: 0, or where an appended run stopped)
    max_items: int | None = None  # most items to process in this run
    append: bool = False  # add to the matrix already in `out`
    force: bool = False  # overwrite `out` (without append)
    n_ctx: int = 4096
    n_batch: int = 512
    threads: int | None = None
    kv_type: str = "f16"  # llama.cpp's defaults; "f32" + flash_attn False for exact f32 math
    flash_attn: bool | None = None
    n_gpu_layers: int | None = None
    process_output: bool = False  # also collect output.weight (llama-imatrix --process-output)
    progress: bool = True


@dataclass
class ImatrixResult:
    path: Path
    first: int  # index of the first item processed by this run
    done: int  # items processed by this run
    total_items: int  # items in the calibration set
    chunk_count: int  # chunks (items) the matrix holds in total
    entries: int  # weights with statistics


def compute_imatrix(job: ImatrixJob) -> ImatrixResult:
    """Run `job`; ValueError (one line) on bad input, naming the item. An interruption (or a bad
    item) leaves `out` holding the items finished before it."""
    items = read_calibration(job.calibration)
    out = Path(job.out)
    for p in (job.lm, job.mmproj, job.calibration):
        if p is not None and out.resolve() == Path(p).resolve():
            raise ValueError(f"{out}: output would overwrite an input file")
    label = str(job.calibration)
    if job.append:
        base = read_imatrix_sums(out)
    else:
        if out.exists() and not job.force:
            raise ValueError(f"{out}: output exists (use --force to overwrite, or --append to add to it)")
        base = ImatrixSums({}, {})
    resumable = job.append and bool(base.datasets) and _same_path(base.datasets[-1], label)
    first = job.chunk if job.chunk is not None else (base.chunk_count if resumable else 0)
    if first < 0 or first > len(items) or (first == len(items) and not resumable):
        raise ValueError(f"--chunk {first}: the calibration set {label} has {len(items)} items")
    todo = items[first:] if job.max_items is None else items[first : first + job.max_items]
    datasets = base.datasets if resumable else base.datasets + [label]
    if any(it.needs_vision for it in todo) and job.mmproj is None:
        first_media = next(it for it in todo if it.needs_vision)
        raise ValueError(f"{first_media.where}: images/videos need the mmproj (--mmproj or --model-dir)")
    if not todo:  # an appended run on the same set that already finished
        return ImatrixResult(out, first, 0, len(items), base.chunk_count, len(base.sums))

    done = 0
    collector = ImatrixCollector(job.process_output)
    model = _load(job, collector, vision=any(it.needs_vision for it in todo))
    bar = tqdm(total=len(todo), unit="item", desc="imatrix", disable=not job.progress)
    try:
        for it in todo:
            bar.set_postfix_str(Path(it.where).name, refresh=False)
            try:
                _evaluate(model, it)
                collector.commit()
            except (ValueError, RuntimeError) as e:  # bad media, prompt too long, NaN activations
                collector.discard()
                msg = " ".join(str(e).split())
                raise ValueError(msg if msg.startswith(it.where) else f"{it.where}: {msg}") from None
            except BaseException:
                collector.discard()
                raise
            done += 1
            if collector.totals.sums:
                _save(out, base, collector.totals, datasets, base.chunk_count + done, job.n_ctx)
            bar.update(1)
    finally:
        bar.close()
        model.close()
        if model.vision is not None:
            model.vision.close()
    if not collector.totals.sums and not base.sums:
        raise ValueError(
            f"{label}: no matmul saw 16 or more positions at once (llama-imatrix ignores smaller "
            "batches); the calibration items are too short"
        )
    entries = len(set(base.sums) | set(collector.totals.sums))
    return ImatrixResult(out, first, done, len(items), base.chunk_count + done, entries)


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _evaluate(model, it: Item) -> None:
    model.reset()
    if it.kind != "text":
        model.prefill(it.messages())
        return
    # raw text as llama-imatrix runs its text file: tokens only, special tokens recognised, no BOS
    # (Qwen3 adds none), fresh cache per context-sized piece
    ctx = model.ctx
    tokens = model.lm.tokenize(it.text, parse_special=True)
    for s in range(0, len(tokens), ctx.n_ctx):
        ctx.clear()
        ctx.decode_tokens(tokens[s : s + ctx.n_ctx], 0)
    ctx.clear()


def _load(job: ImatrixJob, collector: ImatrixCollector, vision: bool):
    """MiniCPMV from the runtime's public pieces, with the collector as llama.cpp's eval callback."""
    from minicpmv.cpu import default_threads
    from minicpmv.runtime.chat import MiniCPMV
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.llama_context import ContextParams, LlamaContext
    from minicpmv.runtime.loader import check_pair
    from minicpmv.runtime.vision import VisionEncoder

    threads = job.threads or default_threads()
    enc = VisionEncoder.load(job.mmproj, n_threads=threads) if vision else None
    lm = LlamaModel(job.lm, n_gpu_layers=job.n_gpu_layers)
    check_pair(enc, lm)
    ctx = LlamaContext(
        lm,
        ContextParams(
            n_ctx=job.n_ctx,
            n_batch=job.n_batch,
            n_threads=threads,
            kv_type=job.kv_type,
            flash_attn=job.flash_attn,
            cb_eval=collector,
            logits_all=True,
        ),
    )
    return MiniCPMV(lm, ctx, enc)


def _save(out: Path, base: ImatrixSums, new: Stats, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    sums, counts = {}, {}
    for name in sorted(set(base.sums) | set(new.sums)):
        s = new.sums.get(name)
        b = base.sums.get(name)
        if s is not None and b is not None and b.shape != s.shape:
            raise ValueError(
                f"{out}: entry {name} has {b.size} values, the model gives {s.size}; "
                "the matrix was computed for another model"
            )
        sums[name] = (0 if b is None else b.astype(np.float64)) + (0 if s is None else s)
        counts[name] = (0 if b is None else np.round(base.counts[name]).astype(np.int64)) + (
            0 if s is None else new.counts[name]
        )
    write_imatrix(out, ImatrixSums(sums, counts, datasets, chunk_count, chunk_size))
