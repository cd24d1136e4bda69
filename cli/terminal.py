"""`minicpm-run` in a terminal: one answer printed (streamed, or as JSON), or an interactive chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from minicpmv.schema import THINK_END, THINK_START
from minicpmv.session.conversation import Conversation
from minicpmv.session.media import MediaError, describe_media, load_file
from minicpmv.session.options import ChatOptions, MediaOptions

DIM, RESET = "\x1b[2m", "\x1b[0m"


def fail(msg: str, code: int = 2, prog: str = "minicpm-run") -> None:
    msg = " ".join(str(msg).split())  # always one line
    typer.echo(f"{prog}: error: {msg}", err=True)
    raise typer.Exit(code)


def print_stats(stats, out=None) -> None:
    out = out or sys.stderr
    v = stats.vision_ms
    if v:
        print(
            f"vision: {len(v)} slices encoded, {sum(v) / len(v):.1f} ms per slice ({stats.images_encoded} images)",
            file=out,
        )
    print(
        f"prefill: {stats.tokens_prefilled} tokens (from position {stats.prefill_start} of "
        f"{stats.prompt_tokens}) in {stats.prefill_ms:.0f} ms, {stats.prefill_tps:.1f} tok/s",
        file=out,
    )
    print(
        f"decode: {stats.decode_tokens} tokens in {stats.decode_ms:.0f} ms, {stats.decode_tps:.1f} tok/s; "
        f"time to first token {stats.ttft_ms:.0f} ms; finish: {stats.finish_reason}",
        file=out,
    )


def answer_once(model, conv: Conversation, o: ChatOptions, *, stream: bool, as_json: bool, verbose: bool) -> str:
    """Run one turn, print it, return the answer text."""
    kw = o.chat_kwargs()
    tty = sys.stdout.isatty()
    if as_json:
        a = model.chat(conv.msgs, **kw)
        typer.echo(
            json.dumps(
                {
                    "answer": str(a),
                    "thinking": a.thinking,
                    "finish_reason": a.stats.finish_reason,
                    "timings": a.stats.as_dict(),
                },
                ensure_ascii=False,
            )
        )
    elif stream:
        s = model.chat(conv.msgs, stream=True, **kw)
        in_think, shown = False, ""
        for p in s:
            if p.thinking and not in_think and tty:
                sys.stdout.write(DIM)
            if not p.thinking and in_think:  # reasoning done: close it on its own paragraph
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
    if verbose:
        print_stats(a.stats)
    return str(a)


def interactive(model, conv: Conversation, o: ChatOptions, media: MediaOptions, *, stream: bool, verbose: bool) -> None:
    typer.echo(
        "Interactive chat. Commands: /image PATH (image or video for the next question), /reset, "
        "/think (toggle thinking), /quit",
        err=True,
    )
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
            path = line[len("/image") :].strip()
            if not path:
                typer.echo("usage: /image PATH", err=True)
                continue
            try:
                item = load_file(Path(path).expanduser(), media, progress=verbose or sys.stderr.isatty())
            except MediaError as e:
                typer.echo(f"error: {e}", err=True)
                continue
            conv.add_media(item)
            typer.echo(f"(added {path}: {describe_media(item)})", err=True)
            continue
        if line.startswith("/"):
            typer.echo(f"unknown command {line.split()[0]}; commands: /image PATH, /reset, /think, /quit", err=True)
            continue
        conv.ask(line)  # typed text is text: a path here is a question, not a file
        try:
            conv.answered(answer_once(model, conv, o, stream=stream, as_json=False, verbose=verbose))
        except (ValueError, RuntimeError) as e:
            conv.retract()
            typer.echo(f"error: {e}", err=True)
        except KeyboardInterrupt:
            conv.retract()
            typer.echo("\n(interrupted)", err=True)
