"""`POST /v1/chat/completions`: the OpenAI request -> a conversation and chat options; the answer
-> the response or its server-sent-event chunks (docs/serving.md §2 maps every field).

Fields beyond OpenAI's follow the peers: vLLM's `chat_template_kwargs` ({"enable_thinking": true}),
`mm_processor_kwargs` (fps, packing, max_frames, max_slice_nums), `top_k`, `repetition_penalty`;
llama.cpp's `input_video` part and its `timings`. The reasoning comes back in `reasoning_content`
(llama-server's and vLLM <= 0.10's name), present only when thinking is on.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from minicpmv.session.limits import Limits
from minicpmv.session.options import DEFAULT_MAX_TOKENS, ChatOptions, MediaOptions

from .errors import bad_request
from .media import MediaLoader
from .stream_text import StreamText

UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs")  # refused when given a value
PACKING_MAX = 6


@dataclass
class ChatRequest:
    msgs: list[dict]
    opts: ChatOptions
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _is(v, kind, param: str, what: str):
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise bad_request(f"{param} must be {what}", param)
    return v


def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None, kind=(int, float)):
    v = body.get(name)
    if v is None:
        return None
    _is(v, kind, name, "an integer" if kind is int else "a number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise bad_request(f"{name} must be {span}, got {v}", name)
    return v


def parse_chat_request(body, loader: MediaLoader, limits: Limits) -> ChatRequest:
    """Check and translate a request body; media are decoded here (APIError, a 4xx, for any fault)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], 0):
            raise bad_request(f"{name} is not supported by this server", name)
    n = body.get("n")
    if n not in (None, 1):
        raise bad_request("n: only one choice per request is supported (n = 1)", "n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise bad_request("response_format: only text answers are supported", "response_format")
    stream = bool(_is(body.get("stream", False), bool, "stream", "true or false"))
    so = body.get("stream_options") or {}
    _is(so, dict, "stream_options", "an object")

    kw = body.get("chat_template_kwargs") or {}
    _is(kw, dict, "chat_template_kwargs", "an object")
    think = kw.get("enable_thinking", False)
    _is(think, bool, "chat_template_kwargs.enable_thinking", "true or false")
    mm = body.get("mm_processor_kwargs") or {}
    _is(mm, dict, "mm_processor_kwargs", "an object")
    media = MediaOptions()
    if "fps" in mm:
        media.fps = float(_number(mm, "fps", 0.01, 60))
    if mm.get("packing") is not None:
        media.packing = int(_number(mm, "packing", 1, PACKING_MAX, kind=int))
    if "max_frames" in mm:
        media.max_frames = int(_number(mm, "max_frames", 1, 10_000, kind=int))
    max_slices = _number(mm, "max_slice_nums", 1, 36, kind=int)

    max_tokens = _number(body, "max_completion_tokens", 1, kind=int) or _number(body, "max_tokens", 1, kind=int)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    try:
        limits.check_max_tokens(
            max_tokens, "max_tokens" if "max_completion_tokens" not in body else "max_completion_tokens"
        )
    except ValueError as e:
        raise bad_request(str(e), "max_tokens") from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise bad_request("stop must be a string or a list of at most 16 strings", "stop")
    seed = _number(body, "seed", kind=int)
    temperature = _number(body, "temperature", 0, 2)
    msgs, system = _messages(body.get("messages"), loader, media)
    opts = ChatOptions(
        think=think,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 0, 1),
        top_k=_number(body, "top_k", 0, kind=int),
        repeat_penalty=_number(body, "repetition_penalty", 0.01, 10),
        seed=seed,
        greedy=temperature == 0,
        system=system,
        max_slices=max_slices,
        stop=stop,
    )
    return ChatRequest(
        msgs, opts, stream, include_usage=bool(so.get("include_usage")), model=str(body.get("model") or "")
    )


def _messages(messages, loader: MediaLoader, media: MediaOptions) -> tuple[list[dict], str]:
    """(conversation for MiniCPMV.chat, system prompt). System/developer messages become the system
    prompt (the reference puts it first); parts keep their order within a message."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out, system = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            system.append(_text_only(content, where))
            continue
        if role == "assistant":
            out.append({"role": "assistant", "content": _text_only(content, where)})
            continue
        if role != "user":
            raise bad_request(
                f"{where}.role {role!r} is not supported (system, developer, user, assistant)", "messages"
            )
        out.append({"role": "user", "content": _user_content(content, where, loader, media)})
    if not out or out[0]["role"] != "user":
        raise bad_request("the conversation must start with a user message (after any system message)", "messages")
    return out, "\n".join(system)


def _text_only(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise bad_request(f"{where}.content: system and assistant messages hold text only", "messages")


def _user_content(content, where: str, loader: MediaLoader, media: MediaOptions) -> list:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "messages")
    items = []
    for j, p in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            items.append(_is(p.get("text"), str, f"{param}.text", "a string"))
        elif kind == "image_url":
            url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) else p.get("image_url")
            items.append(loader.image(loader.from_url(url, f"{param}.image_url"), param))
        elif kind == "video_url":
            url = (p.get("video_url") or {}).get("url") if isinstance(p.get("video_url"), dict) else p.get("video_url")
            items.append(loader.video(loader.from_url(url, f"{param}.video_url"), media, param))
        elif kind == "input_video":
            v = p.get("input_video")
            _is(v, dict, f"{param}.input_video", "an object with data (base64) or url")
            raw = (
                loader.from_base64(v["data"], param)
                if v.get("data") is not None
                else loader.from_url(v.get("url"), f"{param}.input_video.url")
            )
            items.append(loader.video(raw, media, param))
        else:
            raise bad_request(
                f"{param}: content part type {kind!r} is not supported (text, image_url, video_url, input_video)",
                "messages",
            )
    return items


# --------------------------------------------------------------------------- responses


def timings(stats) -> dict:
    """llama-server's `timings` (prompt_n: positions decoded for this request, the KV cache's reuse
    excluded) plus vision_ms."""

    def rate(n, ms):
        return (n / ms * 1e3) if ms else 0.0

    def per(ms, n):
        return ms / n if n else 0.0

    return {
        "cache_n": stats.prefill_start,
        "prompt_n": stats.tokens_prefilled,
        "prompt_ms": stats.prefill_ms,
        "prompt_per_token_ms": per(stats.prefill_ms, stats.tokens_prefilled),
        "prompt_per_second": rate(stats.tokens_prefilled, stats.prefill_ms),
        "predicted_n": stats.decode_tokens,
        "predicted_ms": stats.decode_ms,
        "predicted_per_token_ms": per(stats.decode_ms, stats.decode_tokens),
        "predicted_per_second": rate(stats.decode_tokens, stats.decode_ms),
        "vision_ms": sum(stats.vision_ms),
    }


def usage(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.decode_tokens,
        "total_tokens": stats.prompt_tokens + stats.decode_tokens,
    }


def finish_reason(stats) -> str:
    return "stop" if stats.finish_reason == "stop" else "length"


def completion(req: ChatRequest, model: str, answer) -> dict:
    message = {"role": "assistant", "content": str(answer)}
    if req.opts.think:
        message["reasoning_content"] = answer.thinking
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(answer.stats), "logprobs": None}],
        "usage": usage(answer.stats),
        "timings": timings(answer.stats),
    }


class ChunkWriter:
    """The server-sent events of one streamed answer, as llama-server sends them: a first delta with
    the role, content (or reasoning_content) deltas, a delta {} with finish_reason (and timings),
    the usage chunk when asked for, then [DONE]."""

    def __init__(self, req: ChatRequest, model: str):
        self.req, self.model = req, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._text = StreamText()

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        c = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        if self.req.include_usage:
            c.setdefault("usage", None)
        return sse(c)

    def start(self) -> str:
        return self._chunk({"role": "assistant", "content": None})

    def piece(self, piece) -> str:
        text = self._text.text(piece)
        return self._chunk({"reasoning_content" if piece.thinking else "content": text}) if text else ""

    def end(self, answer) -> str:
        out = self._chunk({}, finish_reason(answer.stats), timings=timings(answer.stats))
        if self.req.include_usage:
            out += sse(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage(answer.stats),
                }
            )
        return out + "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
