"""`minicpm-run --web`: a local chat page (Gradio) on one loaded model.

A personal tool: one model, one answer at a time (Gradio's queue, concurrency 1, shows a second
tab that it waits), bound to 127.0.0.1 unless --host says otherwise. Serving many users is
llama-server's or Ollama's job. The conversation logic is in web_chat.py; this module is the
page layout, its events and the server.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import sys

import gradio as gr

from minicpmv.schema import REFERENCE_SAMPLING as S, THINKING_SAMPLING as TS

from .run import Opts
from .web_chat import LocalChat, Session, chat_messages

# Local fonts only: the default theme pulls web fonts from the internet, and the page must work offline.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
CSS = """
#error, #error * { color: #b91c1c !important; }
#chat small { opacity: 0.7; font-size: 0.78em; }
"""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: where it resolves to
        return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_port(host: str, port: int) -> None:
    """Raise OSError (one line) unless (host, port) can be listened on: before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") \
            from None


def _optional(label: str, value, empty: str = "default") -> gr.Textbox:
    """A number field that may stay empty (gr.Number shows None as 0)."""
    return gr.Textbox("" if value is None else str(value), label=label, placeholder=empty, max_lines=1,
                      elem_id=label.lower().replace(" ", "-"))


def _number(label: str, text: str, kind=float):
    """The value of an _optional field: None when empty; ValueError (one line) when not a number."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{label}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def page_opts(o: Opts, think, max_tokens, seed, greedy, temperature, top_p, top_k, repeat_penalty,
              system) -> Opts:
    """The CLI options with the page's settings applied."""
    return dataclasses.replace(
        o, think=bool(think), max_tokens=int(max_tokens or o.max_tokens), seed=_number("Seed", seed, int),
        greedy=bool(greedy), temperature=_number("Temperature", temperature), top_p=_number("Top-p", top_p),
        top_k=_number("Top-k", top_k, int), repeat_penalty=_number("Repetition penalty", repeat_penalty),
        system=system or "")


def build_page(chat: LocalChat, title: str) -> gr.Blocks:
    o = chat.opts
    with gr.Blocks(title="MiniCPM-V 4.5", analytics_enabled=False) as page:
        session = gr.State(lambda: Session())   # a new conversation per tab (the class itself would be
        # taken for a dataclass value)
        gr.Markdown(f"### MiniCPM-V 4.5 · local chat\n<small>{title}</small>")
        chatbot = gr.Chatbot(elem_id="chat", height="60vh", min_height=360, show_label=False, buttons=["copy"],
                             feedback_options=None, allow_file_downloads=False,
                             placeholder="Drop images or a video into the box below and ask about them.")
        error = gr.Markdown(visible=False, elem_id="error")
        box = gr.MultimodalTextbox(elem_id="msg", file_count="multiple", file_types=["image", "video"],
                                   sources=["upload"], show_label=False, submit_btn=True,
                                   placeholder="Ask about images or a video (drop or attach files)…")
        with gr.Row():
            think = gr.Checkbox(o.think, label="Thinking", elem_id="think", container=False, scale=4,
                                min_width=100)
            stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm", scale=1, min_width=90)
            regen = gr.Button("Regenerate", elem_id="regenerate", size="sm", scale=1, min_width=90)
            clear = gr.Button("Clear", elem_id="clear", size="sm", scale=1, min_width=90)
        with gr.Accordion("Sampling", open=False, elem_id="sampling"):
            # text fields, not numbers: empty means the model card's default (or a random seed), as
            # leaving the CLI option out does
            with gr.Row():
                max_tokens = gr.Number(o.max_tokens, label="Max new tokens", precision=0, minimum=1,
                                       elem_id="max-tokens")
                seed = _optional("Seed", o.seed, "random")
                greedy = gr.Checkbox(o.greedy, label="Greedy", elem_id="greedy",
                                     info="always take the most likely token")
            with gr.Row():
                temperature = _optional("Temperature", o.temperature)
                top_p = _optional("Top-p", o.top_p)
                top_k = _optional("Top-k", o.top_k)
                repeat_penalty = _optional("Repetition penalty", o.repeat_penalty)
            gr.Markdown("<small>Empty: the model card's sampling, which differs with thinking on "
                        f"(T {S.temperature}; top-p {S.top_p}, top-k {S.top_k}, penalty {S.repetition_penalty} "
                        f"without; {TS.top_p}, {TS.top_k}, {TS.repetition_penalty} with).</small>")
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
                opts = page_opts(o, *values)
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
        model_queue = dict(inputs=[session, *settings], outputs=[chatbot, error], concurrency_id="model",
                           concurrency_limit=1, show_progress="minimal")
        gate = dict(fn=has_question, inputs=session, outputs=None, queue=False)
        for asked in (box.submit(ask, [session, box], [chatbot, error, box]),
                      regen.click(regenerate, [session], [chatbot, error, box])):
            asked.then(**gate).success(answer, **model_queue).then(**unlock)
        clear.click(clear_all, [session], [chatbot, error])
        # Stop must not wait behind the answer it stops: no concurrency limit, no queue.
        stop.click(chat.stop, [session], None, queue=False)
    return page


def serve(model, opts: Opts, host: str, port: int, title: str) -> None:
    """Serve the page until Ctrl+C."""
    page = build_page(LocalChat(model, opts), title)
    page.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    page.launch(server_name=host, server_port=port, quiet=True, prevent_thread_lock=True, show_error=True,
                theme=theme, css=CSS, enable_monitoring=False, ssr_mode=False, footer_links=[])
    shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    print(f"minicpm-run: chat page at http://{shown_host}:{page.server_port}/ (Ctrl+C to stop)", file=sys.stderr,
          flush=True)
    try:
        page.block_thread()
    finally:
        page.close()
