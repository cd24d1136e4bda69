"""`minicpm-convert`: Hugging Face MiniCPM-V 4.5 checkpoint -> llama.cpp GGUF files (+ Ollama Modelfile)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt so that the conversion's
    own cleanup runs (by default these signals end the process with its temporary files left)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    for sig in _SIGNALS + (signal.SIGINT,):  # a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def fail(e: BaseException | str) -> None:
    """One line (names in a damaged file may hold newlines), exit 2."""
    typer.echo(f"minicpm-convert: error: {' '.join(str(e).split())}", err=True)
    raise typer.Exit(2)


def quant_table() -> str:
    """--quant types with bits per weight and the size of the 8B language model (computed from the
    published checkpoint's tensor shapes with the converter's own per-tensor rules)."""
    from minicpmv.convert.lm_plan import published_lm_layout
    from minicpmv.quant.policy import SPECS
    from minicpmv.quant.sizes import mixture_size

    cfg, tensors = published_lm_layout()
    t = cfg.text
    sizes = [
        mixture_size(tensors, s, t.num_hidden_layers, t.num_attention_heads // t.num_key_value_heads)
        for s in SPECS.values()
    ]
    lines = ["--quant types (bits per weight, 8B language-model GGUF; * needs --imatrix):", ""]
    for m in sorted(sizes, key=lambda m: -m.bpw):
        lines.append(f"{m.name:<8} {m.bpw:5.2f} bpw {m.nbytes / 1e9:6.2f} GB{'  *' if m.needs_imatrix else ''}")
    return "\n".join(lines)


@app.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=quant_table())
def convert(
    ckpt: Optional[str] = typer.Argument(
        None,
        metavar="CKPT_DIR|REPO_ID",
        help="Checkpoint folder (config.json, model-*.safetensors + index, tokenizer "
        "files), or a Hugging Face repo id such as openbmb/MiniCPM-V-4_5: its "
        "safetensors, index, configs and tokenizer files are downloaded into "
        "the Hugging Face cache (only those) and converted from there.",
    ),
    out: Optional[Path] = typer.Option(
        None, "-o", "--out", help="Output folder for the GGUF files (created if missing)."
    ),
    quant_type: str = typer.Option(
        "Q4_K_M",
        "--quant",
        "--outtype",
        "-q",
        help="Language-model type (llama-quantize's names and per-tensor mixtures; "
        "the list with sizes is below). Q3_K, Q4_K, Q5_K mean the _M mixtures.",
    ),
    mmproj_type: str = typer.Option("f16", "--mmproj-type", help="Vision projector type: f16, f32, bf16, q8_0."),
    imatrix: Optional[Path] = typer.Option(
        None,
        "--imatrix",
        help="llama.cpp importance matrix (GGUF or legacy .dat; e.g. from minicpm-imatrix). "
        "Required by the types marked * below, used by all quantized types.",
    ),
    ollama: bool = typer.Option(False, "--ollama", help="Also write OUT/Modelfile for `ollama create`."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing output files."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Quantization threads (default: all cores)."),
    no_mmproj: bool = typer.Option(False, "--no-mmproj", help="Write only the language model."),
    no_lm: bool = typer.Option(False, "--no-lm", help="Write only the mmproj."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    modelfile_only: Optional[Path] = typer.Option(
        None,
        "--modelfile-only",
        metavar="DIR",
        help="Convert nothing: write DIR/Modelfile for the language-model and mmproj GGUFs already in DIR "
        "(told apart by their metadata, e.g. OpenBMB's ggml-model-Q4_K_M.gguf + mmproj-model-f16.gguf).",
    ),
) -> None:
    """Convert a MiniCPM-V 4.5 checkpoint (a folder or a Hugging Face repo id) to a language-model GGUF and
    a vision mmproj GGUF.

    Writes OUT/MiniCPM-V-4.5-<QUANT>.gguf and OUT/mmproj-MiniCPM-V-4.5-<TYPE>.gguf, streaming tensor by
    tensor (memory bounded by the largest tensor). Both load in stock llama.cpp (llama-mtmd-cli,
    llama-server) and Ollama; run them here with `minicpm-run --model-dir OUT`.
    """
    from minicpmv.convert.pipeline import convert as run

    if modelfile_only is not None:
        from minicpmv.convert.modelfile import modelfile_for_existing

        try:
            typer.echo(str(modelfile_for_existing(modelfile_only, force=force)))
        except (ValueError, OSError) as e:
            fail(e)
        return
    if ckpt is None or out is None:
        typer.echo(
            "minicpm-convert: error: need CKPT_DIR (or a Hub repo id) and -o OUT (or --modelfile-only DIR)", err=True
        )
        raise typer.Exit(2)
    ckpt_dir = checkpoint_folder(ckpt, quiet)  # a download killed halfway resumes next time
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        res = run(
            ckpt_dir,
            out,
            quant_type=quant_type,
            mmproj_type=mmproj_type,
            imatrix=imatrix,
            ollama=ollama,
            force=force,
            threads=threads,
            progress=not quiet,
            write_lm=not no_lm,
            write_mmproj=not no_mmproj,
            log=lambda msg: typer.echo(f"minicpm-convert: {msg}", err=True),
        )
    except (ValueError, OSError) as e:  # CheckpointError, OutputExistsError, bad type names, I/O
        fail(e)
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        typer.echo(
            f"\nminicpm-convert: interrupted ({signal.Signals(signum).name}): no output written, "
            "temporary files removed",
            err=True,
        )
        raise typer.Exit(128 + signum) from None
    for p in (res.lm_path, res.mmproj_path, res.modelfile):
        if p is not None:
            typer.echo(str(p))


def checkpoint_folder(arg: str, quiet: bool) -> Path:
    """A folder as given; an argument that is no folder but looks like OWNER/NAME is fetched from the Hub."""
    from minicpmv.hub.source import looks_like_repo_id

    path = Path(arg).expanduser()
    if path.exists() or not looks_like_repo_id(arg):
        return path  # a missing folder is reported by the checkpoint reader
    from huggingface_hub.utils import logging as hf_logging

    from minicpmv import hub

    hf_logging.set_verbosity_error()  # its retry warnings would break the one-line error rule
    try:
        return hub.fetch_checkpoint(
            arg, say=(lambda m: None) if quiet else (lambda m: typer.echo(m, err=True)), progress=not quiet
        )
    except ValueError as e:  # HubError, RepoFilesError
        msg = str(e)
        if isinstance(e, hub.RepoNotFoundError):  # "REPO: repository not found on the Hub ..."
            msg = f"{arg}: no such folder, and {msg.split(': ', 1)[-1]}"
        typer.echo(f"minicpm-convert: error: {' '.join(msg.split())}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("minicpm-convert: download interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
