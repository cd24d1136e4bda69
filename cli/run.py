"""`minicpm-run`: chat with MiniCPM-V 4.5 about images and videos from the command line.

    minicpm-run photo.jpg "What is in the image?"     # OpenBMB's Q4_K_M GGUFs, fetched once from the Hub
    minicpm-run --hf openbmb/MiniCPM-V-4_5-gguf:Q8_0 photo.jpg "What is in the image?"
    minicpm-run --model-dir OUT photo.jpg "What is in the image?"
    minicpm-run -m MiniCPM-V-4.5-Q4_K_M.gguf --mmproj mmproj-MiniCPM-V-4.5-F16.gguf clip.mp4 "Describe the video."
    minicpm-run --model-dir OUT photo.jpg          # no question: interactive chat about photo.jpg
    minicpm-run --list-cached                      # what the Hub cache holds
    minicpm-run --web                              # a chat page at http://127.0.0.1:7860

The options are declared once in cli/options.py (shared with the page and minicpm-serve); this
module checks them, opens the model (session/model.py) and hands over to the terminal chat
(cli/terminal.py) or the page (cli/web.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from minicpmv.session.conversation import Conversation
from minicpmv.session.limits import Limits
from minicpmv.session.media import MediaError, describe_media, load_file
from minicpmv.session.model import ModelOpenError, choose_files, open_model
from minicpmv.session.options import ChatOptions, MediaOptions, ModelOptions

from . import options as opt
from .terminal import answer_once, fail, interactive

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def model_title(model_path: Path, mmproj_path: Path, n_ctx: Optional[int], n_ctx_train: int) -> str:
    """The page's subtitle: the two files (wherever they came from) and the context size."""
    context = f"context {n_ctx} tokens" if n_ctx else f"context grows with the conversation up to {n_ctx_train} tokens"
    return f"{Path(model_path).name} + {Path(mmproj_path).name} · {context}"


def _is_file(arg: str) -> bool:
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):  # e.g. a long question is "File name too long"
        return False


def show_cached() -> None:
    from minicpmv import hub

    models, partial = hub.list_cached()
    typer.echo(f"Hugging Face cache: {hub.hf_cache_dir()}")
    if not models and not partial:
        typer.echo(f'no MiniCPM-V model cached yet; `minicpm-run IMAGE "QUESTION"` downloads {hub.DEFAULT_MODEL}')
    for c in models:
        typer.echo(f"{c.repo}: {c.summary}  ->  {c.use}")
    for repo, n in partial:
        typer.echo(f"{repo}: unfinished download, {hub.size_text(n)} so far (the same command resumes it)")


# no_args_is_help: a bare `minicpm-run` shows the help instead of fetching 6 GB for an empty chat.
@app.command(context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
def run(
    inputs: List[str] = typer.Argument(
        None,
        metavar="[IMAGE|VIDEO ...] [QUESTION]",
        help="Image or video files, then the question. Without a question "
        "(the last argument is a file, or nothing is given) an "
        "interactive chat starts. The question is always text.",
    ),
    model: opt.Model = None,
    mmproj: opt.Mmproj = None,
    model_dir: opt.ModelDir = None,
    hf: opt.Hf = None,
    mmproj_quant: opt.MmprojQuant = None,
    refresh: opt.Refresh = False,
    list_cached: bool = typer.Option(
        False, "--list-cached", help="List the MiniCPM-V models in the Hugging Face cache and exit."
    ),
    think: opt.Think = False,
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end instead of streaming it."),
    max_tokens: opt.MaxTokens = opt.C.max_tokens,
    temperature: opt.Temperature = None,
    top_p: opt.TopP = None,
    top_k: opt.TopK = None,
    repeat_penalty: opt.RepeatPenalty = None,
    greedy: opt.Greedy = False,
    seed: opt.Seed = None,
    system: opt.System = "",
    max_slices: opt.MaxSlices = None,
    image_id: opt.ImageId = None,
    threads: opt.Threads = None,
    ctx: opt.Ctx = None,
    low_memory: opt.LowMemory = False,
    kv_type: opt.KvType = None,
    flash_attn: opt.FlashAttn = None,
    gpu_layers: opt.GpuLayers = None,
    vision_dtype: opt.VisionDtype = "auto",
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, thinking, timings."),
    fps: opt.Fps = opt.M.fps,
    packing: opt.Packing = None,
    max_frames: opt.MaxFrames = opt.M.max_frames,
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Print timings (vision ms per slice, prefill and decode tokens/s) and "
        "the context size and KV cache MiB whenever the context is created or grown.",
    ),
    llama_log: opt.LlamaLog = False,
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        help="Print a system report for bug reports (versions, CPU, llama.cpp build, "
        "weight buffers, vision precision, threads) and exit.",
    ),
    web: bool = typer.Option(
        False,
        "--web",
        help="Start a local chat page (drop images and videos, see the reasoning) instead "
        "of a terminal chat; needs pip install 'minicpmv[web]'. The other options "
        "set the page's model and defaults.",
    ),
    host: opt.Host = "127.0.0.1",
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="--web: port to listen on."),
    auth: Optional[str] = typer.Option(
        None,
        "--auth",
        metavar="USER:PASSWORD|FILE",
        help="--web: require this login (or the USER:PASSWORD lines of FILE).",
    ),
    no_auth: opt.NoAuth = False,
    max_upload_mb: opt.MaxUploadMb = opt.L.max_upload_mb,
    max_image_pixels: opt.MaxImagePixels = opt.L.max_image_pixels,
    max_video_seconds: opt.MaxVideoSeconds = opt.L.max_video_seconds,
    max_video_frames: opt.MaxVideoFrames = opt.L.max_video_frames,
    max_video_pixels: opt.MaxVideoPixels = opt.L.max_video_pixels,
    max_new_tokens: opt.MaxNewTokens = opt.L.max_new_tokens,
    max_queue: opt.MaxQueue = opt.L.max_queue,
) -> None:
    """Ask MiniCPM-V 4.5 about images and videos, or chat interactively.

    The prompt is the reference model's (chat template, image ids, an overview and up to --max-slices
    slices per image, 64 tokens each); the language model runs on llama.cpp, the vision encoder on
    torch. Videos are sampled at --fps and packed into groups of frames that share 64 tokens (3D
    resampler).

    Without a model option the GGUF files come from the Hugging Face Hub: $MINICPMV_MODEL if set, else
    OpenBMB's openbmb/MiniCPM-V-4_5-gguf (Q4_K_M language model + f16 mmproj, about 6.1 GB), downloaded
    once into the Hugging Face cache (HF_HOME) and used from there without network afterwards.

    --web serves the same chat as a page; uploads and answers are held to the --max-* limits.
    """
    if version:
        from .system_report import format_report, system_report

        typer.echo(format_report(system_report()))
        return
    if list_cached:
        show_cached()
        return
    inputs = list(inputs or [])
    question = inputs.pop() if inputs and not _is_file(inputs[-1]) else None
    mo = opt.pick(ModelOptions, locals())
    co = opt.pick(ChatOptions, locals())
    media = opt.pick(MediaOptions, locals())
    page = None
    if web:
        page = _web_checks(inputs, question, as_json, host, port, auth, no_auth)
        lim = opt.pick(Limits, locals())
        try:
            lim.check_max_tokens(co.max_tokens, "--max-tokens")
        except ValueError as e:
            fail(str(e))
    elif question is None and as_json:
        fail("--json needs a question")

    conv = Conversation()
    progress = verbose or sys.stderr.isatty()
    for f in inputs:  # files named on the command line are the operator's own: loaded as they are
        try:
            item = load_file(Path(f), media, progress=progress)
        except MediaError as e:
            fail(str(e))
        conv.add_media(item)
        if verbose:
            typer.echo(f"{f}: {describe_media(item)}", err=True)
    try:
        files = choose_files(mo, say=lambda msg: typer.echo(msg, err=True), progress=progress, verbose=verbose)
        if verbose:
            typer.echo(f"model: {files.model}\nmmproj: {files.mmproj}", err=True)
        m = open_model(files, mo)
    except ModelOpenError as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo("minicpm-run: interrupted; run the same command again to resume a download", err=True)
        raise typer.Exit(130) from None
    m.progress = progress  # long videos: a bar while frames are encoded
    if verbose:
        typer.echo(f"vision dtype: {m.vision.dtype_choice.describe()}", err=True)
        typer.echo(f"weight buffers: {m.lm.buffers.plan.mode}: {m.lm.buffers.plan.reason}", err=True)
        m.watch_context(lambda change: typer.echo(str(change), err=True))
    if page is not None:
        try:
            page.serve(
                m,
                co,
                media,
                lim,
                host,
                port,
                auth=auth,
                title=model_title(m.lm.path, m.vision.path, ctx, m.lm.n_ctx_train),
            )
        except (OSError, ValueError) as e:  # the port was taken since check_port; an unreadable --auth file
            fail(str(e))
        except KeyboardInterrupt:
            pass
        return
    if question is None:
        interactive(m, conv, co, media, stream=not no_stream, verbose=verbose)
        return
    conv.ask(question)
    try:
        answer_once(m, conv, co, stream=not no_stream, as_json=as_json, verbose=verbose)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _web_checks(
    inputs: list, question: Optional[str], as_json: bool, host: str, port: int, auth: Optional[str], no_auth: bool
):
    """--web's own checks, before anything is loaded; returns the page module."""
    from .listen import check_exposure, check_port

    if inputs or question is not None:
        fail("--web takes no files or question: drop them on the page")
    if as_json:
        fail("--json does not apply to --web")
    try:
        from minicpmv.cli import web as page
    except ImportError as e:
        fail(f"--web needs Gradio ({e}): pip install 'minicpmv[web]'")
    try:
        check_exposure(host, auth is not None, no_auth, "--auth USER:PASSWORD")
        page.read_auth(auth)
        check_port(host, port)
    except (OSError, ValueError) as e:
        fail(str(e))
    return page


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
