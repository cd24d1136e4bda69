"""`minicpm-run`: chat with MiniCPM-V 4.5 about images and videos from the command line.

    minicpm-run --model-dir OUT photo.jpg "What is in the image?"
    minicpm-run -m MiniCPM-V-4.5-Q4_K_M.gguf --mmproj mmproj-MiniCPM-V-4.5-F16.gguf clip.mp4 "Describe the video."
    minicpm-run --model-dir OUT photo.jpg          # no question: interactive chat about photo.jpg
    minicpm-run --model-dir OUT --web              # a chat page at http://127.0.0.1:7860
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

DIM, RESET = "\x1b[2m", "\x1b[0m"
WEB_CTX = 8192  # --web: room for a few images or a short video per conversation (a video is ~70 per group)


def fail(msg: str, code: int = 2) -> None:
    msg = " ".join(str(msg).split())  # always one line
    typer.echo(f"minicpm-run: error: {msg}", err=True)
    raise typer.Exit(code)


def _video_module():
    """minicpmv.runtime.video, or None when video support (PyAV) is unavailable."""
    try:
        from minicpmv.runtime import video
    except ImportError:
        return None
    return video


def load_media(path: Path, opts: "Opts", progress: bool = False):
    """An image (PIL RGB) or a video (VideoFrames: sampled and packed per --fps/--packing/--max-frames),
    loaded once; the runtime takes both as content. Raises ValueError/OSError with one line."""
    from minicpmv.runtime.image import load_image
    video = _video_module()
    if video is not None and video.is_video_path(path):
        return video.load_video(path, fps=opts.fps, packing=opts.packing, max_frames=opts.max_frames,
                                progress=progress)
    return load_image(path)


def is_video(item) -> bool:
    return hasattr(item, "temporal_ids")


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

    @property
    def n_groups(self) -> int:
        """64-token units the pending media need (for sizing the context)."""
        return sum(len(p.temporal_ids) if is_video(p) else 10 for p in self.pending)

    @property
    def has_video(self) -> bool:
        return any(is_video(p) for p in self.pending)

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
            t = f"<think>\n{a.thinking}\n</think>"
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


def model_title(model_dir: Optional[Path], model: Optional[Path], mmproj: Optional[Path], n_ctx: int) -> str:
    files = f"{model_dir}" if model_dir is not None else f"{model.name} + {mmproj.name}"
    return f"{files} · context {n_ctx} tokens"


def _is_file(arg: str) -> bool:
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):  # e.g. a long question is "File name too long"
        return False


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    inputs: List[str] = typer.Argument(None, metavar="[IMAGE|VIDEO ...] [QUESTION]",
                                       help="Image or video files, then the question. Without a question "
                                            "(the last argument is a file, or nothing is given) an "
                                            "interactive chat starts."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Language-model GGUF file."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector (mmproj) GGUF file."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", "-d",
                                             help="Folder holding both GGUF files (told apart by their metadata)."),
    think: bool = typer.Option(False, "--think/--no-think", help="Thinking mode: the model reasons before answering."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end instead of streaming it."),
    max_tokens: int = typer.Option(2048, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", min=0.0,
                                                help="Sampling temperature (default 0.7)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                          help="Nucleus sampling (default 0.8; 1.0 with --think)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0,
                                        help="Top-k sampling, 0 = off (default 100; 50 with --think)."),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty", min=0.0,
                                                   help="Repetition penalty (default 1.03; 1.0 with --think)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token (deterministic)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (default: random)."),
    system: str = typer.Option("", "--system", help="System prompt."),
    max_slices: Optional[int] = typer.Option(None, "--max-slices", min=1,
                                             help="Most slices per image (default 9; 1 for videos)."),
    image_id: Optional[bool] = typer.Option(None, "--image-id/--no-image-id",
                                            help="Number images in the prompt "
                                                 "(default: on for images, off for videos)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: all cores)."),
    ctx: Optional[int] = typer.Option(None, "--ctx", "-c", min=256,
                                      help="Context length in tokens (default 4096, more if a video needs it; "
                                           f"{WEB_CTX} with --web)."),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers",
                                             help="Layers on the GPU (-1 all; default: all on macOS, none elsewhere)."),
    vision_dtype: str = typer.Option("auto", "--vision-dtype", help="Vision encoder precision: auto, bf16, f32."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: answer, thinking, timings."),
    fps: float = typer.Option(5.0, "--fps", min=0.01, help="Video: frames sampled per second."),
    packing: Optional[int] = typer.Option(None, "--packing", min=1, max=6,
                                          help="Video: frames per 64-token group (default: automatic, at most 3)."),
    max_frames: int = typer.Option(180, "--max-frames", min=1, help="Video: most groups (64-token units) per video."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print timings: vision ms per slice, prefill and decode tokens/s."),
    llama_log: bool = typer.Option(False, "--llama-log", help="Show llama.cpp's own log (silent by default)."),
    web: bool = typer.Option(False, "--web",
                             help="Start a local chat page (drop images and videos, see the reasoning) instead "
                                  "of a terminal chat; needs pip install 'minicpmv[web]'. The other options "
                                  "set the page's model and defaults."),
    host: str = typer.Option("127.0.0.1", "--host", help="--web: address to listen on (other machines can "
                                                         "reach the page unless it is a loopback address)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="--web: port to listen on."),
) -> None:
    """Ask MiniCPM-V 4.5 about images and videos, or chat interactively.

    The prompt is the reference model's (chat template, image ids, 64 tokens per slice, up to 9 slices);
    the language model runs on llama.cpp, the vision encoder on torch. Videos are sampled at --fps and
    packed into groups of frames that share 64 tokens (3D resampler).
    """
    from minicpmv.runtime import MiniCPMV

    inputs = list(inputs or [])
    question = None
    if inputs and not _is_file(inputs[-1]):
        question = inputs.pop()
    if model_dir is None and model is None:
        fail("give the model: --model-dir DIR, or --model LM.gguf --mmproj MMPROJ.gguf")
    if model_dir is not None and (model is not None or mmproj is not None):
        fail("use either --model-dir or --model/--mmproj, not both")
    if model is not None and mmproj is None:
        fail("--mmproj is required with --model (or use --model-dir)")

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
    n_ctx = ctx or (WEB_CTX if web else 4096)
    if ctx is None and conv.has_video:  # ~70 positions per frame group + room to answer
        n_ctx = max(4096, 72 * conv.n_groups + min(max_tokens, 4096) + 512)
    try:
        m = MiniCPMV.load(model_dir if model_dir is not None else model, mmproj, n_ctx=n_ctx, n_threads=threads,
                          n_gpu_layers=gpu_layers, vision_dtype=vision_dtype, verbose=llama_log)
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))
    m.progress = o.verbose or sys.stderr.isatty()  # long videos: a bar while frames are encoded
    if web:
        try:
            web_page.serve(m, o, host, port, title=model_title(model_dir, model, mmproj, n_ctx))
        except OSError as e:  # the port was taken since check_port
            fail(f"cannot listen on {host}:{port} ({e}): choose another --port or --host")
        except KeyboardInterrupt:
            pass
        return
    if question is None:
        if as_json:
            fail("--json needs a question")
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
