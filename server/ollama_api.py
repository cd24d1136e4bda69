"""Ollama's native API on the same port, so Ollama clients work unchanged: `POST /api/chat` and
`/api/generate` (images as bare base64, `think`, `options`, NDJSON streaming, the default), and the
descriptions `/api/tags`, `/api/show`, `/api/version` (docs/serving.md §3).

Differences from Ollama, each on purpose: `think` left out means off (the reference chat()'s
default; Ollama turns it on for thinking models); an item of `images` may also be a video (told by
its first bytes, sampled with the model card's defaults: Ollama has no video input at all);
`num_ctx` is accepted and ignored (the context grows with the conversation up to the trained one).
"""

from __future__ import annotations

import datetime as dt
import json

from minicpmv.runtime.results import Piece
from minicpmv.runtime.video import sniff_container
from minicpmv.session.limits import Limits
from minicpmv.session.options import DEFAULT_MAX_TOKENS, ChatOptions, MediaOptions

from .errors import bad_request
from .media import MediaLoader
from .stream_text import StreamText

NS = 1_000_000  # Ollama's durations are in nanoseconds; ChatStats' in milliseconds


def _options(body: dict, limits: Limits) -> ChatOptions:
    o = body.get("options") or {}
    if not isinstance(o, dict):
        raise bad_request("options must be an object", "options")

    def num(name: str, kind=(int, float), lo=None):
        v = o.get(name)
        if v is None:
            return None
        if not isinstance(v, kind) or isinstance(v, bool):
            raise bad_request(f"options.{name} must be a number", name)
        if lo is not None and v < lo:
            raise bad_request(f"options.{name} must be at least {lo}", name)
        return v

    n = num("num_predict", int)
    n = DEFAULT_MAX_TOKENS if n is None or n < 0 else n  # -1 / -2: "as long as needed" -> the default
    if n == 0:
        raise bad_request("options.num_predict must be at least 1", "num_predict")
    try:
        limits.check_max_tokens(n, "options.num_predict")
    except ValueError as e:
        raise bad_request(str(e), "num_predict") from None
    stop = o.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("options.stop must be a list of strings", "stop")
    think = body.get("think", False)
    if think not in (True, False, None, "low", "medium", "high", "max"):
        raise bad_request("think must be true, false, or low/medium/high", "think")
    temperature = num("temperature", lo=0)
    return ChatOptions(
        think=think not in (False, None),
        max_tokens=n,
        temperature=temperature,
        top_p=num("top_p", lo=0),
        top_k=num("top_k", int, lo=0),
        repeat_penalty=num("repeat_penalty", lo=0.01),
        seed=num("seed", int),
        greedy=temperature == 0,
        stop=stop,
    )


def _images(images, where: str, loader: MediaLoader) -> list:
    if images is None:
        return []
    if not isinstance(images, list):
        raise bad_request(f"{where}.images must be a list of base64 strings", "images")
    out = []
    for k, b64 in enumerate(images):
        param = f"{where}.images[{k}]"
        data = loader.from_base64(b64, param)
        out.append(
            loader.video(data, MediaOptions(), param) if sniff_container(data[:12]) else loader.image(data, param)
        )
    return out


def parse_chat(body, loader: MediaLoader, limits: Limits) -> tuple[list[dict], ChatOptions]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_format(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    opts = _options(body, limits)
    msgs, system = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
            raise bad_request(f"{where} must be an object with a string content", "messages")
        role, text = m.get("role"), m.get("content", "")
        if role == "system":
            system.append(text)
        elif role == "assistant":
            msgs.append({"role": "assistant", "content": text})
        elif role == "user":
            msgs.append({"role": "user", "content": [*_images(m.get("images"), where, loader), text]})
        else:
            raise bad_request(f"{where}.role {role!r} is not supported (system, user, assistant)", "messages")
    if not msgs or msgs[0]["role"] != "user":
        raise bad_request("the conversation must start with a user message (after any system message)", "messages")
    opts.system = "\n".join(system)
    return msgs, opts


def parse_generate(body, loader: MediaLoader, limits: Limits) -> tuple[list[dict], ChatOptions]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_format(body)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string", "prompt")
    if body.get("raw") or body.get("suffix"):
        raise bad_request(
            "raw prompts and suffix are not supported (the prompt is always the model's template)",
            "raw" if body.get("raw") else "suffix",
        )
    opts = _options(body, limits)
    system = body.get("system") or ""
    if not isinstance(system, str):
        raise bad_request("system must be a string", "system")
    opts.system = system
    return [{"role": "user", "content": [*_images(body.get("images"), "request", loader), prompt]}], opts


def _check_format(body: dict) -> None:
    if body.get("format") not in (None, ""):
        raise bad_request("format (structured output) is not supported by this server", "format")


# --------------------------------------------------------------------------- responses


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _stats(answer, total_s: float) -> dict:
    s = answer.stats
    return {
        "done_reason": "stop" if s.finish_reason == "stop" else "length",
        "total_duration": int(total_s * 1e9),
        "load_duration": 0,
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": int((s.prefill_ms + sum(s.vision_ms)) * NS),
        "eval_count": s.decode_tokens,
        "eval_duration": int(s.decode_ms * NS),
    }


def chat_final(model: str, answer, think: bool, total_s: float, stream: bool) -> dict:
    """The last NDJSON line of a stream (empty content), or the whole non-streamed reply."""
    message = {"role": "assistant", "content": "" if stream else str(answer)}
    if think and not stream:
        message["thinking"] = answer.thinking
    return {"model": model, "created_at": now(), "message": message, "done": True, **_stats(answer, total_s)}


def chat_piece(model: str, piece, think_text: str | None) -> dict:
    message = {"role": "assistant", "content": "" if think_text is not None else str(piece)}
    if think_text is not None:
        message["thinking"] = think_text
    return {"model": model, "created_at": now(), "message": message, "done": False}


def generate_final(model: str, answer, think: bool, total_s: float, stream: bool) -> dict:
    out = {"model": model, "created_at": now(), "response": "" if stream else str(answer), "done": True}
    if think and not stream:
        out["thinking"] = answer.thinking
    return {**out, **_stats(answer, total_s)}


def generate_piece(model: str, piece, think_text: str | None) -> dict:
    out = {"model": model, "created_at": now(), "response": "" if think_text is not None else str(piece), "done": False}
    if think_text is not None:
        out["thinking"] = think_text
    return out


class PieceLines:
    """The NDJSON lines of a stream's pieces: reasoning in `thinking`, the answer in
    `content`/`response`, each as the final message holds it (stream_text.py)."""

    def __init__(self, model: str, piece_json):
        self.model, self.piece_json = model, piece_json
        self._text = StreamText()

    def line(self, piece: Piece) -> str | None:
        """The line for one piece, or None when nothing is left of it."""
        text = self._text.text(piece)
        if not text:
            return None
        return ndjson(self.piece_json(self.model, text, text if piece.thinking else None))


def ndjson(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
