"""`minicpm-serve`: MiniCPM-V 4.5 behind the OpenAI and Ollama HTTP APIs, images and video included.

    minicpm-serve                                   # OpenBMB's Q4_K_M GGUFs, http://127.0.0.1:8080
    minicpm-serve --model-dir OUT --port 8000
    minicpm-serve --host 0.0.0.0 --api-key "$KEY"   # other machines: only with a key (or --no-auth)

The model options are minicpm-run's (cli/options.py). The files are found (and downloaded from the
Hub if need be) before the server listens; the model then loads while /health answers "loading".
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from minicpmv.session.limits import Limits
from minicpmv.session.model import ModelOpenError, choose_files, open_model
from minicpmv.session.options import ModelOptions

from . import options as opt
from .listen import check_exposure, check_port, url_host
from .terminal import fail

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
PROG = "minicpm-serve"
KEY_ENV = "MINICPMV_API_KEY"


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def serve(
    model: opt.Model = None,
    mmproj: opt.Mmproj = None,
    model_dir: opt.ModelDir = None,
    hf: opt.Hf = None,
    mmproj_quant: opt.MmprojQuant = None,
    refresh: opt.Refresh = False,
    threads: opt.Threads = None,
    ctx: opt.Ctx = None,
    low_memory: opt.LowMemory = False,
    kv_type: opt.KvType = None,
    flash_attn: opt.FlashAttn = None,
    gpu_layers: opt.GpuLayers = None,
    vision_dtype: opt.VisionDtype = "auto",
    llama_log: opt.LlamaLog = False,
    host: opt.Host = "127.0.0.1",
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar=KEY_ENV,
        show_envvar=True,
        help="Require `Authorization: Bearer KEY` on every endpoint but /health.",
    ),
    no_auth: opt.NoAuth = False,
    alias: Optional[str] = typer.Option(
        None, "--alias", help="The model's name in /v1/models and /api/tags (default: the language-model file's name)."
    ),
    allowed_local_media: Optional[Path] = typer.Option(
        None,
        "--allowed-local-media",
        metavar="DIR",
        file_okay=False,
        help="Let requests name media as file:// URLs under DIR (off: media come inline as data: URIs or base64).",
    ),
    parallel: int = typer.Option(
        0,
        "--parallel",
        "-np",
        min=0,
        help="Conversations decoded at once (slots; one batched decode step advances them all). 0 = automatic: "
        "4 where memory allows, 1 with --low-memory. With 1, requests are answered one at a time and the context "
        "grows with the conversation; with N > 1 every slot holds --ctx positions (default 4096).",
    ),
    cache_mb: int = typer.Option(
        512,
        "--cache-mb",
        min=0,
        help="Memory for encoded images and video groups kept across requests (a 1344x1344 photo takes ~10 MB).",
    ),
    max_body_mb: opt.MaxBodyMb = opt.L.max_body_mb,
    max_upload_mb: opt.MaxUploadMb = opt.L.max_upload_mb,
    max_image_pixels: opt.MaxImagePixels = opt.L.max_image_pixels,
    max_video_seconds: opt.MaxVideoSeconds = opt.L.max_video_seconds,
    max_video_frames: opt.MaxVideoFrames = opt.L.max_video_frames,
    max_video_pixels: opt.MaxVideoPixels = opt.L.max_video_pixels,
    max_new_tokens: opt.MaxNewTokens = opt.L.max_new_tokens,
    max_queue: opt.MaxQueue = opt.L.max_queue,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request (uvicorn's access log)."),
) -> None:
    """Serve MiniCPM-V 4.5 over HTTP: the OpenAI chat-completions API (/v1: images and videos as data: URIs,
    thinking, streaming) and Ollama's API (/api) on one port; --parallel conversations decoded at once,
    up to --max-queue more waiting.

    Bound to 127.0.0.1 by default; another --host needs --api-key (or --no-auth). --max-upload-mb bounds
    each media item, --max-body-mb a request; media URLs are never fetched.
    """
    from minicpmv.server.app import ServerState, create_app
    from minicpmv.server.media import MediaLoader

    mo = opt.pick(ModelOptions, locals())
    limits = opt.pick(Limits, locals())
    if allowed_local_media is not None and not allowed_local_media.is_dir():
        fail(f"--allowed-local-media {allowed_local_media}: no such folder", prog=PROG)
    try:
        check_exposure(host, bool(api_key), no_auth, "--api-key KEY")
        check_port(host, port)
        files = choose_files(mo, say=lambda msg: typer.echo(msg, err=True), progress=sys.stderr.isatty())
    except (OSError, ValueError) as e:
        fail(str(e), prog=PROG)
    except KeyboardInterrupt:
        typer.echo(f"{PROG}: interrupted; run the same command again to resume a download", err=True)
        raise typer.Exit(130) from None

    from .listen import is_loopback

    state = ServerState(
        limits=limits,
        loader=MediaLoader(limits, allowed_local_media),
        api_key=api_key or None,
        loopback_only=is_loopback(host),
    )
    server = _uvicorn(create_app(state), host, port, verbose)
    loader = threading.Thread(target=_load, args=(state, server, files, mo, cache_mb, alias, parallel), daemon=True)
    typer.echo(
        f"{PROG}: http://{url_host(host)}:{port}/ (OpenAI API /v1, Ollama API /api); loading {Path(files.model).name}",
        err=True,
    )
    loader.start()
    try:
        server.run()
    finally:
        if state.engine is not None:
            state.engine.close()
            state.engine.model.close()
    if state.load_error:
        raise typer.Exit(2)


def _load(state, server, files, mo, cache_mb: int, alias: str | None, parallel: int) -> None:
    """Load the model while the server answers /health with 'loading'; a failure ends the server."""
    from minicpmv.server.app import served_name
    from minicpmv.server.engine import BatchEngine, Engine
    from minicpmv.server.model_info import ModelInfo

    m = None
    try:
        m = open_model(files, mo)
        n_seq, n_ctx_seq, note = choose_slots(m, parallel, mo.ctx, mo.low_memory, available_bytes())
    except (ModelOpenError, ValueError) as e:
        if m is not None:
            m.close()
        state.load_error = str(e)
        typer.echo(f"{PROG}: error: {e}", err=True)
        server.should_exit = True
        return
    m.vision_cache.max_bytes = cache_mb << 20
    state.info = ModelInfo.read(served_name(m.lm.path, alias), m.lm.path, m.vision.path)
    if n_seq == 1:
        state.engine = Engine(m, state.limits.max_queue)
    else:
        state.engine = BatchEngine(m, n_seq, n_ctx_seq, state.limits.max_queue)
    typer.echo(f"{PROG}: ready: {state.info.name} ({state.info.quant}, {state.info.parameter_size}); {note}", err=True)


SLOT_CTX = 4096  # positions per slot by default: an image question (~700) and a 2048-token answer, twice
AUTO_SLOTS = 4
RESERVE = 1 << 30  # memory left free beside the KV cache: compute buffers, vision activations, requests


def available_bytes() -> int | None:
    """MemAvailable (Linux), None elsewhere (then nothing is checked)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_slots(
    model, parallel: int, ctx: int | None, low_memory: bool, available: int | None
) -> tuple[int, int, str]:
    """(slots, positions per slot, a line for the log). `parallel` 0 picks the most of AUTO_SLOTS
    whose KV cache fits in `available` beside RESERVE (1 with --low-memory); an explicit count that
    does not fit is a ValueError naming what it needs."""
    gib = 2**30
    if parallel == 1 or (parallel == 0 and low_memory):
        return 1, 0, "one request at a time, the context grows with the conversation"
    per_slot = ctx or SLOT_CTX
    if per_slot > model.lm.n_ctx_train:
        raise ValueError(
            f"--ctx {per_slot} is more than the {model.lm.n_ctx_train} positions the model was trained with"
        )
    kv = model._context.kv_bytes(per_slot)
    room = None if available is None else available - RESERVE
    n = parallel or AUTO_SLOTS
    if parallel == 0 and room is not None:
        n = max(1, min(AUTO_SLOTS, room // kv))
    if room is not None and n * kv > room:
        raise ValueError(
            f"--parallel {n} x --ctx {per_slot} needs {n * kv / gib:.2f} GiB of KV cache, but "
            f"{available / gib:.2f} GiB of memory is available ({RESERVE / gib:.0f} GiB kept free); "
            "lower --parallel or --ctx"
        )
    if n == 1:
        return 1, 0, "one request at a time (memory for one slot only), the context grows with the conversation"
    kv_type = model._context.params.kv_type
    return n, per_slot, f"{n} slots x {per_slot} positions, KV cache {n * kv / gib:.2f} GiB ({kv_type})"


def _uvicorn(application, host: str, port: int, verbose: bool):
    import uvicorn

    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    return uvicorn.Server(config)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
