"""`minicpm-run --web`: a local chat page (Gradio) on one loaded model.

A personal tool: one model, one answer at a time (Gradio's queue, concurrency 1, shows a second
tab that it waits; at most --max-queue waiting), bound to 127.0.0.1 unless --host says otherwise,
and then only with a login (--auth) or --no-auth. Media come only as uploads, at most
--max-upload-mb each, deleted from Gradio's upload folder after an hour. Apps that speak HTTP use
`minicpm-serve`. The conversation logic is in web_chat.py; this module is the page layout, its
events and the server.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import gradio as gr

from minicpmv.schema import REFERENCE_SAMPLING as S
from minicpmv.schema import THINKING_SAMPLING as TS
from minicpmv.session.limits import FLAGS, Limits
from minicpmv.session.options import ChatOptions, MediaOptions

from .listen import url_host
from .web_chat import LocalChat, Session, chat_messages

# Local fonts only: the default theme pulls web fonts from the internet, and the page must work offline.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
CSS = """
#error, #error * { color: #b91c1c !important; }
#chat small { opacity: 0.7; font-size: 0.78em; }
"""


# Gradio deletes uploaded files older than DELETE_AFTER_S, checking every DELETE_EVERY_S.
DELETE_EVERY_S, DELETE_AFTER_S = 600, 3600


def read_auth(auth: str | None) -> list[tuple[str, str]] | None:
    """--auth: "USER:PASSWORD", or a file of such lines (blank lines and # comments skipped).
    ValueError (one line) for a malformed entry or an unreadable file."""
    if auth is None:
        return None
    path = Path(auth)
    lines, where = ([auth], "--auth") if not path.is_file() else (path.read_text().splitlines(), str(path))
    out = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where}{f' line {i}' if where != '--auth' else ''}: expected USER:PASSWORD")
        out.append((user, password))
    if not out:
        raise ValueError(f"{where}: no USER:PASSWORD entry")
    return out


def _optional(label: str, value, empty: str = "default") -> gr.Textbox:
    """A number field that may stay empty (gr.Number shows None as 0)."""
    return gr.Textbox(
        "" if value is None else str(value),
        label=label,
        placeholder=empty,
        max_lines=1,
        elem_id=label.lower().replace(" ", "-"),
    )


def _number(label: str, text: str, kind=float):
    """The value of an _optional field: None when empty; ValueError (one line) when not a number."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{label}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def page_opts(
    o: ChatOptions, limits: Limits, think, max_tokens, seed, greedy, temperature, top_p, top_k, repeat_penalty, system
) -> ChatOptions:
    """The CLI options with the page's settings applied (ValueError, one line, for a bad one)."""
    n = int(max_tokens or o.max_tokens)
    if n > limits.max_new_tokens:
        raise ValueError(
            f"Max new tokens: {n} is more than the limit of {limits.max_new_tokens} ({FLAGS['max_new_tokens']})"
        )
    return dataclasses.replace(
        o,
        think=bool(think),
        max_tokens=n,
        seed=_number("Seed", seed, int),
        greedy=bool(greedy),
        temperature=_number("Temperature", temperature),
        top_p=_number("Top-p", top_p),
        top_k=_number("Top-k", top_k, int),
        repeat_penalty=_number("Repetition penalty", repeat_penalty),
        system=system or "",
    )


def build_page(chat: LocalChat, title: str) -> gr.Blocks:
    o = chat.opts
    with gr.Blocks(
        title="MiniCPM-V 4.5", analytics_enabled=False, delete_cache=(DELETE_EVERY_S, DELETE_AFTER_S)
    ) as page:
        session = gr.State(lambda: Session())  # a new conversation per tab (the class itself would be
        # taken for a dataclass value)
        gr.Markdown(f"### MiniCPM-V 4.5 · local chat\n<small>{title}</small>")
        chatbot = gr.Chatbot(
            elem_id="chat",
            height="60vh",
            min_height=360,
            show_label=False,
            buttons=["copy"],
            feedback_options=None,
            allow_file_downloads=False,
            placeholder="Drop images or a video into the box below and ask about them.",
        )
        error = gr.Markdown(visible=False, elem_id="error")
        box = gr.MultimodalTextbox(
            elem_id="msg",
            file_count="multiple",
            file_types=["image", "video"],
            sources=["upload"],
            show_label=False,
            submit_btn=True,
            placeholder="Ask about images or a video (drop or attach files)…",
        )
        with gr.Row():
            think = gr.Checkbox(o.think, label="Thinking", elem_id="think", container=False, scale=4, min_width=100)
            stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm", scale=1, min_width=90)
            regen = gr.Button("Regenerate", elem_id="regenerate", size="sm", scale=1, min_width=90)
            clear = gr.Button("Clear", elem_id="clear", size="sm", scale=1, min_width=90)
        with gr.Accordion("Sampling", open=False, elem_id="sampling"):
            # text fields, not numbers: empty means the model card's default (or a random seed), as
            # leaving the CLI option out does
            with gr.Row():
                max_tokens = gr.Number(
                    o.max_tokens,
                    label=f"Max new tokens (at most {chat.limits.max_new_tokens})",
                    precision=0,
                    minimum=1,
                    maximum=chat.limits.max_new_tokens,
                    elem_id="max-tokens",
                )
                seed = _optional("Seed", o.seed, "random")
                greedy = gr.Checkbox(
                    o.greedy, label="Greedy", elem_id="greedy", info="always take the most likely token"
                )
            with gr.Row():
                temperature = _optional("Temperature", o.temperature)
                top_p = _optional("Top-p", o.top_p)
                top_k = _optional("Top-k", o.top_k)
                repeat_penalty = _optional("Repetition penalty", o.repeat_penalty)
            gr.Markdown(
                "<small>Empty: the model card's sampling, which differs with thinking on "
                f"(T {S.temperature}; top-p {S.top_p}, top-k {S.top_k}, penalty {S.repetition_penalty} "
                f"without; {TS.top_p}, {TS.top_k}, {TS.repetition_penalty} with).</small>"
            )
            system = gr.Textbox(o.system, label="System prompt", lines=2, elem_id="system")
        settings = [think, max_tokens, seed, greedy, temperature, top_p, top_k, repeat_penalty, system]

        def shown(s: Session):
            return chat_messages(s), gr.Markdown(s.error, visible=bool(s.error))

        def ask(s: Session, value: dict | None):
            value = value or {}
            ok = chat.ask(s, value.get("text", ""), [str(f) for f in value.get("files", [])])
            # on success the box empties and locks until the answer is done; on error it keeps the
            # question and the files, so the bad one can be removed
            return *shown(s), gr.MultimodalTextbox(value=None if ok else value, interactive=not ok)

        def has_question(s: Session):
            """Gate before the model's queue: a rejected question must not wait there for nothing."""
            if s.pending is None:
                raise gr.Error("no question to answer", visible=False, print_exception=False)

        def answer(s: Session, *values):
            try:
                opts = page_opts(o, chat.limits, *values)
            except ValueError as e:
                chat.reject(s, str(e))
                yield shown(s)
                return
            for _ in chat.answer(s, opts):
                yield shown(s)

        def regenerate(s: Session):
            ok = chat.regenerate(s)
            return *shown(s), (gr.MultimodalTextbox(interactive=False) if ok else gr.skip())

        def clear_all(s: Session):
            chat.clear(s)
            return shown(s)

        unlock = dict(fn=lambda: gr.MultimodalTextbox(interactive=True), outputs=box, queue=False)
        model_queue = dict(
            inputs=[session, *settings],
            outputs=[chatbot, error],
            concurrency_id="model",
            concurrency_limit=1,
            show_progress="minimal",
        )
        gate = dict(fn=has_question, inputs=session, outputs=None, queue=False)
        for asked in (
            box.submit(ask, [session, box], [chatbot, error, box]),
            regen.click(regenerate, [session], [chatbot, error, box]),
        ):
            asked.then(**gate).success(answer, **model_queue).then(**unlock)
        clear.click(clear_all, [session], [chatbot, error])
        # Stop must not wait behind the answer it stops: no concurrency limit, no queue.
        stop.click(chat.stop, [session], None, queue=False)
    return page


def serve(
    model,
    opts: ChatOptions,
    media: MediaOptions,
    limits: Limits,
    host: str,
    port: int,
    title: str,
    auth: str | None = None,
) -> None:
    """Serve the page until Ctrl+C."""
    logins = read_auth(auth)
    page = build_page(LocalChat(model, opts, media, limits), title)
    page.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    page.launch(
        server_name=host,
        server_port=port,
        quiet=True,
        prevent_thread_lock=True,
        show_error=True,
        theme=theme,
        css=CSS,
        enable_monitoring=False,
        ssr_mode=False,
        footer_links=[],
        auth=logins,
        max_file_size=limits.max_upload_bytes,
    )
    print(
        f"minicpm-run: chat page at http://{url_host(host)}:{page.server_port}/ (Ctrl+C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        page.block_thread()
    finally:
        page.close()
