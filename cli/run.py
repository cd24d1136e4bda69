"""`minicpm-run`: chat with MiniCPM-V 4.5 about images and videos from the command line.

    minicpm-run photo.jpg "What is in the image?"     # OpenBMB's Q4_K_M GGUFs, fetched once from the Hub
    minicpm-run --hf openbmb/MiniCPM-V-4_5-gguf:Q8_0 photo.jpg "What is in the image?"
    minicpm-run --model-dir OUT photo.jpg "What is in the image?"
    minicpm-run -m MiniCPM-V-4.5-Q4_K_M.gguf --mmproj mmproj-MiniCPM-V-4.5-F16.gguf clip.mp4 "Describe the video."
    minicpm-run --model-dir OUT photo.jpg          # no question: interactive chat about photo.jpg
    minicpm-run --list-cached                      # what the Hub cache holds
    minicpm-run --web                              # a chat page at http://127.0.0.1:7860
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer

from minicpmv.hub.source import DEFAULT_MODEL, ENV_VAR, ModelChoice, choose_model
from minicpmv.runtime.video import DEFAULT_FPS, MAX_NUM_FRAMES, MAX_NUM_PACKING, PACKING_LIMIT, VideoFrames
from minicpmv.schema import (MAX_SLICE_NUMS, REFERENCE_SAMPLING as S, THINK_END, THINK_START, THINKING_SAMPLING as TS,
                             VIDEO_MAX_SLICE_NUMS)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

DIM, RESET = "\x1b[2m", "\x1b[0m"


def fail(msg: str, code: int = 2) -> None:
    msg = " ".join(str(msg).split())  # always one line
    typer.echo(f"minicpm-run: error: {msg}", err=True)
    raise typer.Exit(code)


def load_media(path: Path, opts: "Opts", progress: bool = False):
    """An image (PIL RGB) or a video (VideoFrames: sampled and packed per --fps/--packing/--max-frames),
    loaded once; the runtime takes both as content. Raises ValueError/OSError with one line."""
    from minicpmv.runtime import content
    return content.load_media(path, fps=opts.fps, packing=opts.packing, max_frames=opts.max_frames,
                              progress=progress)


def is_video(item) -> bool:
    return isinstance(item, VideoFrames)


def describe_media(item) -> str:
    """"640x480", or "15 frames in 5 groups of up to 3" for a video."""
    if is_video(item):
        return f"{len(item.frames)} frames in {len(item.temporal_ids)} groups of up to {item.plan.packing}"
    return f"{item.width}x{item.height}"


@dataclass
class Conversation:
    """Messages so far, and the images/videos waiting for the next question."""
    msgs: list = field(default_factory=list)
    pending: list = field(default_factory=list)

    def add_media(self, path: Path, opts: "Opts") -> str:
        """Load an image or a video once (see load_media); returns a note on what was loaded."""
        item = load_media(path, opts, progress=opts.verbose or sys.stderr.isatty())
        self.pending.append(item)
        return f"{path}: {describe_media(item)}"

    def ask(self, question: str) -> None:
        self.msgs.append({"role": "user", "content": [*self.pending, *([question] if question else [])]})
        self.pending = []

    def answered(self, answer: str) -> None:
        self.msgs.append({"role": "assistant", "content": answer})

    def reset(self) -> None:
        self.msgs, self.pending = [], []


@dataclass
class Opts:
    think: bool
    stream: bool
    max_tokens: int
    temperature: Optional[float]
    top_p: Optional[float]
    top_k: Optional[int]
    repeat_penalty: Optional[float]
    greedy: bool
    seed: Optional[int]
    system: str
    max_slices: Optional[int]
    image_id: Optional[bool]
    as_json: bool
    verbose: bool
    fps: float
    packing: Optional[int]
    max_frames: int


def chat_kwargs(o: Opts) -> dict:
    """Per-call options (slices and image ids default per conversation: see MiniCPMV.chat)."""
    return dict(enable_thinking=o.think, max_new_tokens=o.max_tokens, temperature=o.temperature,
                top_p=o.top_p, top_k=o.top_k, repetition_penalty=o.repeat_penalty, seed=o.seed,
                greedy=o.greedy, system_prompt=o.system, max_slice_nums=o.max_slices, use_image_id=o.image_id)


def print_stats(stats, out=None) -> None:
    out = out or sys.stderr
    v = stats.vision_ms
    if v:
        print(f"vision: {len(v)} slices encoded, {sum(v) / len(v):.1f} ms per slice "
              f"({stats.images_encoded} images)", file=out)
    print(f"prefill: {stats.tokens_prefilled} tokens (from position {stats.prefill_start} of "
          f"{stats.prompt_tokens}) in {stats.prefill_ms:.0f} ms, {stats.prefill_tps:.1f} tok/s", file=out)
    print(f"decode: {stats.decode_tokens} tokens in {stats.decode_ms:.0f} ms, {stats.decode_tps:.1f} tok/s; "
          f"time to first token {stats.ttft_ms:.0f} ms; finish: {stats.finish_reason}", file=out)


def answer_once(model, conv: Conversation, o: Opts) -> str:
    """Run one turn, print it, return the answer text."""
    kw = chat_kwargs(o)
    tty = sys.stdout.isatty()
    if o.as_json:
        a = model.chat(conv.msgs, **kw)
        typer.echo(json.dumps({"answer": str(a), "thinking": a.thinking, "finish_reason": a.stats.finish_reason,
                               "timings": a.stats.as_dict()}, ensure_ascii=False))
    elif o.stream:
        s = model.chat(conv.msgs, stream=True, **kw)
        in_think, shown = False, ""
        for p in s:
            if p.thinking and not in_think and tty:
                sys.stdout.write(DIM)
            if not p.thinking and in_think:   # reasoning done: close it on its own paragraph
                gap = "\n" * max(0, 2 - (len(shown) - len(shown.rstrip("\n"))))
                sys.stdout.write((RESET if tty else "") + gap)
            in_think = p.thinking
            shown = (shown + p)[-2:]
            sys.stdout.write(p)
            sys.stdout.flush()
        if in_think and tty:
            sys.stdout.write(RESET)
        sys.stdout.write("\n")
        a = s.result
    else:
        a = model.chat(conv.msgs, **kw)
        if a.thinking:
            t = f"{THINK_START}\n{a.thinking}\n{THINK_END}"
            typer.echo(f"{DIM}{t}{RESET}\n" if tty else t + "\n")
        typer.echo(str(a))
    if o.verbose:
        print_stats(a.stats)
    return str(a)


def interactive(model, conv: Conversation, o: Opts) -> None:
    typer.echo("Interactive chat. Commands: /image PATH (image or video for the next question), /reset, "
               "/think (toggle thinking), /quit", err=True)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            return
        if line == "/reset":
            conv.reset()
            model.reset()
            typer.echo("(conversation cleared)", err=True)
            continue
        if line == "/think":
            o.think = not o.think
            typer.echo(f"(thinking {'on' if o.think else 'off'})", err=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                typer.echo("usage: /image PATH", err=True)
                continue
            try:
                typer.echo(f"(added {conv.add_media(Path(path).expanduser(), o)})", err=True)
            except (ValueError, OSError) as e:
                typer.echo(f"error: {e}", err=True)
            continue
        if line.startswith("/"):
            typer.echo(f"unknown command {line.split()[0]}; commands: /image PATH, /reset, /think, /quit", err=True)
            continue
        conv.ask(line)
        try:
            conv.answered(answer_once(model, conv, o))
        except (ValueError, RuntimeError) as e:
            conv.msgs.pop()
            typer.echo(f"error: {e}", err=True)
        except KeyboardInterrupt:
            conv.msgs.pop()
            typer.echo("\n(interrupted)", err=True)


def model_title(model_path: Path, mmproj_path: Path, n_ctx: Optional[int], n_ctx_train: int) -> str:
    """The page's subtitle: the two files (wherever they came from) and the context size."""
    context = f"context {n_ctx} tokens" if n_ctx else f"context grows with the conversation up to {n_ctx_train} tokens"
    return f"{Path(model_path).name} + {Path(mmproj_path).name} · {context}"


def _is_file(arg: str) -> bool:
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):  # e.g. a long question is "File name too long"
        return False


def fetch_model(choice: ModelChoice, mmproj_quant: Optional[str], refresh: bool, verbose: bool) -> tuple[Path, Path]:
    """The Hub repo's GGUF pair, from the cache or downloaded (one line before, bars, one line after)."""
    from minicpmv import hub
    if not verbose:  # huggingface_hub's own retry warnings would break the one-line error rule
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    try:
        lm, mm = hub.fetch_gguf(choice.hub, mmproj_quant, refresh=refresh,
                                say=lambda msg: typer.echo(msg, err=True), progress=verbose or sys.stderr.isatty())
    except ValueError as e:  # HubError, RepoFilesError
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo("minicpm-run: download interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if verbose:
        typer.echo(f"model: {lm}\nmmproj: {mm}", err=True)
    return lm, mm


def show_cached() -> None:
    from minicpmv import hub
    models, partial = hub.list_cached()
    typer.echo(f"Hugging Face cache: {hub.hf_cache_dir()}")
    if not models and not partial:
        typer.echo(f"no MiniCPM-V model cached yet; `minicpm-run IMAGE \"QUESTION\"` downloads {DEFAULT_MODEL}")
    for c in models:
        typer.echo(f"{c.repo}: {c.summary}  ->  {c.use}")
    for repo, n in partial:
        typer.echo(f"{repo}: unfinished download, {hub.size_text(n)} so far (the same command resumes it)")


# no_args_is_help: a bare `minicpm-run` shows the help instead of fetching 6 GB for an empty chat.
@app.command(context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
def run(
    inputs: List[str] = typer.Argument(None, metavar="[IMAGE|VIDEO ...] [QUESTION]",
                                       help="Image or video files, then the question. Without a question "
                                            "(the last argument is a file, or nothing is given) an "
                                            "interactive chat starts."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Language-model GGUF file."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector (mmproj) GGUF file."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", "-d",
                                             help="Folder holding both GGUF files (told apart by their metadata)."),
    hf: Optional[str] = typer.Option(None, "--hf", metavar="REPO[:QUANT]",
                                     help="Hugging Face repo with GGUF files, e.g. openbmb/MiniCPM-V-4_5-gguf:Q8_0: "
                                          "the language model of QUANT (default Q4_K_M) and the mmproj are "
                                          "downloaded once into the Hub cache. Without any model option: "
                                          f"${ENV_VAR} (a folder or REPO[:QUANT]), else {DEFAULT_MODEL}."),
    mmproj_quant: Optional[str] = typer.Option(None, "--mmproj-quant", metavar="TYPE",
                                               help="Which mmproj of a Hub repo with several (default: the only "
                                                    "one, else f16)."),
    refresh: bool = typer.Option(False, "--refresh",
                                 help="Ask the Hub for newer files even when the model is cached "
                                      "(cached files are otherwise used without any network request)."),
    list_cached: bool = typer.Option(False, "--list-cached",
                                     help="List the MiniCPM-V models in the Hugging Face cache and exit."),
    think: bool = typer.Option(False, "--think/--no-think", help="Thinking mode: the model reasons before answering."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end instead of streaming it."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", min=0.0,
                                                help=f"Sampling temperature (default {S.temperature})."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                          help=f"Nucleus sampling (default {S.top_p}; {TS.top_p} with --think)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0,
                                        help=f"Top-k sampling, 0 = off (default {S.top_k}; {TS.top_k} with --think)."),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty", min=0.0,
                                                   help=f"Repetition penalty (default {S.repetition_penalty}; "
                                                        f"{TS.repetition_penalty} with --think)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token (deterministic)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (default: random)."),
    system: str = typer.Option("", "--system", help="System prompt."),
    max_slices: Optional[int] = typer.Option(None, "--max-slices", min=1,
                                             help=f"Most slices per image (default {MAX_SLICE_NUMS}; "
                                                  f"{VIDEO_MAX_SLICE_NUMS} for videos)."),
    image_id: Optional[bool] = typer.Option(None, "--image-id/--no-image-id",
                                            help="Number images in the prompt "
                                                 "(default: on for images, off for videos)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", min=256,
                                      help="Fix the context length in tokens. Default: sized for each turn "
                                           "(prompt + --max-tokens, rounded up to 512) and grown as the "
                                           "conversation needs, up to the model's trained context."),
    low_memory: bool = typer.Option(False, "--low-memory",
                                    help="For 8 GB machines: KV cache in q8_0 and the vision weights read from the "
                                         "mmproj for each image instead of kept in memory (about 1.3 GB less; "
                                         "slower vision, slightly different numbers: see README, Memory)."),
    kv_type: Optional[str] = typer.Option(None, "--kv-type",
                                          help="KV cache precision: f16 (default), q8_0 (half the memory; "
                                               "--low-memory's), f32 (exactly reproducible logits)."),
    flash_attn: Optional[bool] = typer.Option(None, "--flash-attn/--no-flash-attn",
                                              help="llama.cpp's flash attention (default: llama.cpp decides, "
                                                   "on for the CPU; q8_0 KV cache needs it)."),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers",
                                             help="Layers on the GPU (-1 all; default: all on macOS, none elsewhere)."),
    vision_dtype: str = typer.Option("auto", "--vision-dtype",
                                     help="Vision encoder precision: auto (bf16 where a quick measurement on this "
                                          "machine finds it at least 15% faster than f32, measured once and "
                                          "cached), bf16, f32."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, thinking, timings."),
    fps: float = typer.Option(float(DEFAULT_FPS), "--fps", min=0.01, help="Video: frames sampled per second."),
    packing: Optional[int] = typer.Option(None, "--packing", min=1, max=PACKING_LIMIT,
                                          help=f"Video: frames per 64-token group (default: automatic, at most "
                                               f"{MAX_NUM_PACKING} as the model card). Above {MAX_NUM_PACKING} is "
                                               "this project's extension: the card caps packing at "
                                               f"{MAX_NUM_PACKING}, this raises the cap."),
    max_frames: int = typer.Option(MAX_NUM_FRAMES, "--max-frames", min=1, help="Video: most groups (64-token units) per video."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print timings (vision ms per slice, prefill and decode tokens/s) and "
                                      "the context size and KV cache MiB whenever the context is created or grown."),
    llama_log: bool = typer.Option(False, "--llama-log", help="Show llama.cpp's own log (silent by default)."),
    version: bool = typer.Option(False, "--version", is_eager=True,
                                 help="Print a system report for bug reports (versions, CPU, llama.cpp build, "
                                      "weight buffers, vision precision, threads) and exit."),
    web: bool = typer.Option(False, "--web",
                             help="Start a local chat page (drop images and videos, see the reasoning) instead "
                                  "of a terminal chat; needs pip install 'minicpmv[web]'. The other options "
                                  "set the page's model and defaults."),
    host: str = typer.Option("127.0.0.1", "--host", help="--web: address to listen on (other machines can "
                                                         "reach the page unless it is a loopback address)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="--web: port to listen on."),
) -> None:
    """Ask MiniCPM-V 4.5 about images and videos, or chat interactively.

    The prompt is the reference model's (chat template, image ids, an overview and up to --max-slices
    slices per image, 64 tokens each); the language model runs on llama.cpp, the vision encoder on
    torch. Videos are sampled at --fps and packed into groups of frames that share 64 tokens (3D
    resampler).

    Without a model option the GGUF files come from the Hugging Face Hub: $MINICPMV_MODEL if set, else
    OpenBMB's openbmb/MiniCPM-V-4_5-gguf (Q4_K_M language model + f16 mmproj, about 6.1 GB), downloaded
    once into the Hugging Face cache (HF_HOME) and used from there without network afterwards.
    """
    if version:
        from minicpmv.cli.system_report import format_report, system_report
        typer.echo(format_report(system_report()))
        return
    from minicpmv.runtime import MiniCPMV

    if list_cached:
        show_cached()
        return
    inputs = list(inputs or [])
    question = None
    if inputs and not _is_file(inputs[-1]):
        question = inputs.pop()
    try:
        choice = choose_model(model, mmproj, model_dir, hf)
    except ValueError as e:
        fail(str(e))
    for p in (model, mmproj):
        if p is not None and p.is_dir():
            fail(f"{p} is a folder: use --model-dir")
    if choice.hub is None and (mmproj_quant is not None or refresh):
        fail(f"--{'mmproj-quant' if mmproj_quant is not None else 'refresh'} applies to a Hub repo; "
             f"the model comes from {choice.origin} here")
    if web:
        if inputs or question is not None:
            fail("--web takes no files or question: drop them on the page")
        if as_json:
            fail("--json does not apply to --web")
        try:
            from minicpmv.cli import web as web_page
        except ImportError as e:
            fail(f"--web needs Gradio ({e}): pip install 'minicpmv[web]'")
        if not web_page.is_loopback(host):
            typer.echo(f"minicpm-run: warning: --host {host} makes the chat page reachable from other machines; "
                       "it has no login", err=True)
        try:
            web_page.check_port(host, port)
        except OSError as e:
            fail(str(e))
    elif question is None and as_json:
        fail("--json needs a question")

    o = Opts(think, not no_stream, max_tokens, temperature, top_p, top_k, repeat_penalty, greedy, seed,
             system, max_slices, image_id, as_json, verbose, fps, packing, max_frames)
    conv = Conversation()
    try:
        for f in inputs:
            note = conv.add_media(Path(f), o)
            if verbose:
                typer.echo(note, err=True)
    except (ValueError, OSError) as e:
        fail(str(e))
    model_path, mmproj_path = choice.path, choice.mmproj
    if choice.hub is not None:
        model_path, mmproj_path = fetch_model(choice, mmproj_quant, refresh, verbose)
    try:
        m = MiniCPMV.load(model_path, mmproj_path, n_ctx=ctx, n_threads=threads, n_gpu_layers=gpu_layers,
                          vision_dtype=vision_dtype, verbose=llama_log, low_memory=low_memory,
                          kv_type=kv_type, flash_attn=flash_attn)
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))
    m.progress = o.verbose or sys.stderr.isatty()  # long videos: a bar while frames are encoded
    if verbose:
        typer.echo(f"vision dtype: {m.vision.dtype_choice.describe()}", err=True)
        typer.echo(f"weight buffers: {m.lm.buffers.plan.mode}: {m.lm.buffers.plan.reason}", err=True)
        m.watch_context(lambda change: typer.echo(str(change), err=True))
    if web:
        try:
            web_page.serve(m, o, host, port, title=model_title(m.lm.path, m.vision.path, ctx, m.lm.n_ctx_train))
        except OSError as e:  # the port was taken since check_port
            fail(f"cannot listen on {host}:{port} ({e}): choose another --port or --host")
        except KeyboardInterrupt:
            pass
        return
    if question is None:
        interactive(m, conv, o)
        return
    conv.ask(question)
    try:
        answer_once(m, conv, o)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
