"""`minicpm-imatrix`: an importance matrix for the low-bit types, computed from image (and video) prompts.

minicpm-imatrix photos/ --model-dir OUT -o imatrix.gguf
minicpm-imatrix calib.jsonl -m MiniCPM-V-4.5-F16.gguf --mmproj mmproj-MiniCPM-V-4.5-F16.gguf -o imatrix.gguf
minicpm-convert CKPT -o OUT --quant IQ2_M --imatrix imatrix.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"minicpm-imatrix: error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(code)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def imatrix(
    calibration: Path = typer.Argument(
        ...,
        metavar="CALIBRATION",
        help="A folder of images/videos (each asked to be described), or a JSONL "
        'file: one item per line, {"image": PATH, "text": QUESTION}, '
        '{"video": PATH, "text": ...}, {"text": ...} (a text-only chat '
        "turn), or a plain text line (run as raw text, as llama-imatrix does). "
        "Relative paths are relative to the JSONL file.",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Output importance matrix (llama.cpp imatrix GGUF)."),
    model: Optional[Path] = typer.Option(
        None, "--model", "-m", help="Language-model GGUF (F16 or BF16 is best; any type works)."
    ),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector GGUF (needed for images/videos)."),
    model_dir: Optional[Path] = typer.Option(
        None, "--model-dir", "-d", help="Folder holding both GGUF files (told apart by their metadata)."
    ),
    chunk: Optional[int] = typer.Option(
        None,
        "--chunk",
        "--from-chunk",
        min=0,
        help="Start at calibration item N (0-based; llama-imatrix's --chunk: every "
        "item is one chunk). Default 0, or with --append on the same "
        "calibration set, the first item the matrix does not hold yet.",
    ),
    max_items: Optional[int] = typer.Option(None, "--max-items", min=1, help="Process at most N items in this run."),
    append: bool = typer.Option(
        False,
        "--append",
        help="Add to the matrix already in OUT (sums and counts add up); on the same "
        "calibration set this resumes an interrupted or partial run.",
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT (without --append)."),
    ctx: int = typer.Option(
        4096,
        "--ctx",
        "-c",
        min=64,
        help="Context per item in tokens (a 9-slice image takes ~670; longer text lines are "
        "cut into pieces of this size).",
    ),
    batch: int = typer.Option(512, "--batch", "-b", min=16, help="Positions per llama.cpp batch."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
    gpu_layers: Optional[int] = typer.Option(
        None, "--gpu-layers", help="Layers on the GPU (-1 all; default: all on macOS, none elsewhere)."
    ),
    process_output: bool = typer.Option(
        False, "--process-output", help="Also collect output.weight (llama-imatrix --process-output)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Compute llama.cpp's importance matrix by running MiniCPM-V 4.5 on images, videos and text.

    llama-imatrix runs text only; here the language model sees what it sees
    in use: the reference chat prompt with the image slices' embeddings from
    the vision encoder. For every matmul weight of the language model, the
    sum of squared inputs per column and the count of input rows are
    collected through llama.cpp's eval callback, exactly as llama-imatrix
    defines them, and written as its GGUF (read by minicpm-convert --imatrix
    and llama-quantize --imatrix). OUT is rewritten after every item: an
    interrupted run keeps its work; run it again with --append to continue.
    """
    from minicpmv.cli.imatrix_compute import ImatrixJob, compute_imatrix

    if model_dir is not None and (model is not None or mmproj is not None):
        fail("use either --model-dir or --model/--mmproj, not both")
    if model_dir is None and model is None:
        fail("give the model: --model-dir DIR, or --model LM.gguf [--mmproj MMPROJ.gguf]")
    if model_dir is not None:
        from minicpmv.gguf_info import ModelFileError, find_model_files

        try:
            model, mmproj = find_model_files(model_dir)
        except ModelFileError as e:
            fail(str(e))
    for p, what in ((model, "language model"), (mmproj, "mmproj")):
        if p is not None and not p.is_file():
            fail(f"{p}: {what} file not found")
    job = ImatrixJob(
        model,
        mmproj,
        calibration,
        out,
        chunk=chunk,
        max_items=max_items,
        append=append,
        force=force,
        n_ctx=ctx,
        n_batch=min(batch, ctx),
        threads=threads,
        n_gpu_layers=gpu_layers,
        process_output=process_output,
        progress=not quiet,
    )
    try:
        res = compute_imatrix(job)
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(
            f"minicpm-imatrix: interrupted; {out} holds the items finished so far "
            f"(continue with the same command and --append)",
            err=True,
        )
        raise typer.Exit(130) from None
    end = res.first + res.done
    typer.echo(
        f"{res.path}: items {res.first}..{end - 1} of {res.total_items} added, {res.chunk_count} chunks, "
        f"{res.entries} weights"
        if res.done
        else f"{res.path}: already holds all {res.total_items} items of {calibration}",
        err=True,
    )
    typer.echo(str(res.path))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
