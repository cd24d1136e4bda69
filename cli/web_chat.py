"""The conversations behind `minicpm-run --web`: one model, a conversation per browser tab.

No Gradio here: `LocalChat` takes a tab's `Session` and the page's options, streams answers into
the session's turns, and `chat_messages` turns a session into what the chat shows. Each tab sends
its own growing `msgs` list to `MiniCPMV.chat()`, so a follow-up question reuses the KV cache
exactly as in the Python API (and a tab switching with another one just re-prefills).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from minicpmv.runtime.video import VideoFrames
from minicpmv.schema import THINK_END, THINK_START
from minicpmv.session.conversation import Conversation
from minicpmv.session.limits import Limits
from minicpmv.session.media import MediaError, describe_media, load_upload
from minicpmv.session.options import ChatOptions, MediaOptions

STREAM_INTERVAL_S = 0.05  # redraw the streamed answer at most this often (every piece still stops)
THINK_MARKS = (THINK_START, THINK_END)


@dataclass
class Turn:
    """One question and its answer as the page shows them."""

    question: str
    images: list[Path]  # shown as thumbnails
    notes: list[str]  # "clip.mp4: 15 frames in 5 groups of up to 3"
    thinking: str = ""  # streamed reasoning (with the model's <think> marks)
    answer: str = ""
    status: str = ""  # "waiting ...", shown until the answer starts
    footer: str = ""  # timings, in small print
    streaming: bool = False
    done: bool = False


@dataclass
class Session:
    """One browser tab: the model's messages (`conv.msgs`) and the turns on the page."""

    conv: Conversation = field(default_factory=Conversation)
    turns: list[Turn] = field(default_factory=list)
    error: str = ""  # the last one-line error, shown under the chat
    stop_requested: bool = False  # set by the Stop button, read between streamed pieces
    busy: bool = False  # an answer is being generated for this tab

    @property
    def pending(self) -> Turn | None:
        """The last turn if it still waits for its answer."""
        return self.turns[-1] if self.turns and not self.turns[-1].done else None


def one_line(e: BaseException | str, path: Path | None = None) -> str:
    """The error as one line; an upload is named by its file name, not the server's temp path."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg.replace(str(path), path.name) if path is not None else msg


def timings(stats, stopped: bool) -> str:
    """vision ms per slice, prefill and decode tok/s of one answer (ChatStats)."""
    parts = []
    if stats.vision_ms:
        v = stats.vision_ms
        parts.append(f"vision {sum(v) / len(v):.1f} ms/slice × {len(v)}")
    # new/total: how much of the conversation the KV cache already held
    parts.append(f"prefill {stats.tokens_prefilled}/{stats.prompt_tokens} tok, {stats.prefill_tps:.0f} tok/s")
    parts.append(f"decode {stats.decode_tokens} tok, {stats.decode_tps:.1f} tok/s")
    parts.append(f"first token {stats.ttft_ms:.0f} ms")
    parts.append("stopped" if stopped else stats.finish_reason)
    return " · ".join(parts)


def _shown_thinking(text: str) -> str:
    for mark in THINK_MARKS:
        text = text.replace(mark, "")
    return text.strip()


def chat_messages(s: Session) -> list[dict]:
    """The session as chat messages: question (thumbnails, video notes, text); reasoning in a
    collapsible "Thinking" block (open while it streams, folded once done); answer; timings."""
    out: list[dict] = []
    for t in s.turns:
        content: list = [{"path": str(p)} for p in t.images]
        text = "\n\n".join([f"*{n}*" for n in t.notes] + ([t.question] if t.question else []))
        if text:
            content.append(text)
        out.append({"role": "user", "content": content})
        if t.thinking:
            thinking_open = t.streaming and not t.answer and THINK_MARKS[1] not in t.thinking
            out.append(
                {
                    "role": "assistant",
                    "content": _shown_thinking(t.thinking) or "…",
                    "metadata": {"title": "Thinking", "status": "pending" if thinking_open else "done"},
                }
            )
        if t.answer or not t.thinking:
            out.append({"role": "assistant", "content": t.answer or t.status or ("" if t.done else "…")})
        if t.footer:
            out.append({"role": "assistant", "content": f"<small>{t.footer}</small>"})
    return out


class LocalChat:
    """The page's one model. Answers run one at a time (the page's queue, and the model's own turn:
    a tab's stream keeps it until the stream is exhausted or closed). Uploads are read once, as
    bytes, and held to `limits`; typed text is only ever text."""

    def __init__(self, model, opts: ChatOptions, media: MediaOptions, limits: Limits):
        self.model = model
        self.opts = opts
        self.media = media
        self.limits = limits
        self.answering = 0  # tabs being answered right now

    # -- questions -----------------------------------------------------------------------------

    def ask(self, s: Session, text: str, files: list[str]) -> bool:
        """Check and load the uploads (files the page received), then queue the question. On a bad
        upload: s.error is set, the conversation is unchanged, and False is returned."""
        s.error = ""
        if s.busy or s.pending:
            s.error = "an answer is still being generated: wait for it or press Stop"
            return False
        text = (text or "").strip()
        if not text and not files:
            return False
        items, images, notes = [], [], []
        for f in files:
            path = Path(f)
            try:
                item = self.load_upload(path)
            except (MediaError, OSError) as e:
                s.error = one_line(e, path)
                return False
            items.append(item)
            if isinstance(item, VideoFrames):
                notes.append(f"{path.name}: {describe_media(item)}")
            else:
                images.append(path)
        s.conv.pending = items
        s.conv.ask(text)
        status = "waiting: another tab's answer is being generated (one at a time)" if self.answering else ""
        s.turns.append(Turn(text, images, notes, status=status))
        s.stop_requested = False
        return True

    def load_upload(self, path: Path):
        """One uploaded file, read once (its size checked before it is read)."""
        size = path.stat().st_size
        if size > self.limits.max_upload_bytes:
            raise MediaError(
                f"{path.name}: {size / 2**20:.1f} MB is more than the limit of "
                f"{self.limits.max_upload_mb:g} MB (--max-upload-mb)"
            )
        return load_upload(path.read_bytes(), path.name, self.media, self.limits)

    def regenerate(self, s: Session) -> bool:
        """Forget the last answer and ask again."""
        s.error = ""
        if s.busy:
            s.error = "an answer is still being generated: wait for it or press Stop"
            return False
        if not s.turns or not s.turns[-1].done:
            return False
        s.conv.retract()  # the assistant message; the question stays
        last = s.turns[-1]
        s.turns[-1] = Turn(last.question, last.images, last.notes)
        s.stop_requested = False
        return True

    def clear(self, s: Session) -> None:
        if s.busy:
            s.error = "an answer is still being generated: wait for it or press Stop"
            return
        s.conv.reset()
        s.turns, s.error = [], ""

    def reject(self, s: Session, error: str) -> None:
        """Drop the pending question (bad settings): the page shows `error`, the conversation is as before."""
        if s.pending and not s.busy:
            s.conv.retract()
            s.turns.pop()
        s.error = error

    def stop(self, s: Session) -> None:
        if s.busy or s.pending:
            s.stop_requested = True

    # -- answers -------------------------------------------------------------------------------

    def answer(self, s: Session, opts: ChatOptions) -> Iterator[None]:
        """Stream the answer of the pending turn into it; yields whenever the page should redraw.
        Stop ends it after the current token: the stream is closed and the partial answer kept
        (as the assistant message, so the next question still reuses the KV cache)."""
        turn = s.pending
        if turn is None:
            return
        s.busy, turn.status, turn.streaming = True, "", True
        self.answering += 1
        stream = stats = None
        stopped = s.stop_requested
        try:
            yield
            if not stopped:
                stream = self.model.chat(s.conv.msgs, stream=True, **opts.chat_kwargs())
                stats = stream.stats  # this turn's ChatStats; decode counters land when it ends
            last = time.perf_counter()
            while stream is not None:
                if s.stop_requested:
                    stopped = True
                    break
                piece = next(stream, None)
                if piece is None:
                    break
                if piece.thinking:
                    turn.thinking += piece
                else:
                    turn.answer += piece
                if time.perf_counter() - last >= STREAM_INTERVAL_S:
                    last = time.perf_counter()
                    yield
            result = None if stream is None or stopped else stream.result
            if stream is not None and result is None:
                stream.close()  # stopped: the turn goes back to the model, the counters are kept
            if result is not None:
                turn.answer, turn.thinking = str(result), result.thinking
            turn.answer = turn.answer.strip()
            turn.footer = timings(stats, stopped) if stats is not None else "stopped"
        except GeneratorExit:  # the tab went away (Gradio closes this generator): as a Stop
            turn.answer, turn.footer = turn.answer.strip(), "stopped"
            s.conv.answered(turn.answer)
            raise
        except (ValueError, RuntimeError) as e:  # e.g. the context is full: drop the question
            s.error = one_line(e)
            s.conv.retract()
            s.turns.pop()
        else:
            s.conv.answered(turn.answer)
        finally:
            if stream is not None:
                stream.close()  # whatever ended this answer, the model's turn goes back
            turn.streaming, turn.done = False, True
            s.busy, s.stop_requested = False, False
            self.answering -= 1
        yield
