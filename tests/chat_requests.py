"""What Ollama's `/api/chat` and llama-server's `/v1/chat/completions` accept as a request body, written
for the tests from the receiving code (each check names the rule it follows):

- Ollama, ollama/ollama@fb30760 api/types.go: `ChatRequest` (model, messages, stream, format,
  keep_alive, tools, options, think, truncate, shift, logprobs, top_logprobs), `Message` (role,
  content, thinking, images, tool_calls, tool_name, tool_call_id), `ThinkValue` (a bool or "high",
  "medium", "low", "max"); `ImageData` is a Go []byte, which encoding/json reads from standard padded
  base64, so a `data:` URL there is a 400; server/routes.go `ChatHandler` wants a model name.
- llama-server, at the llama.cpp inside llama-cpp-python 0.3.36: tools/server/server-common.cpp
  `oaicompat_chat_params_parse` (messages an array; content a string or an array of parts; merges
  `chat_template_kwargs`, whose `enable_thinking` must be a boolean), `oaicompat_content_load_media`
  (part types), `handle_media` (a `data:image/...;base64,` URL split at its only comma) and
  tools/server/server-task.cpp (the sampling fields' names).

Stricter than the servers where they let a mistake through without a word: an unknown field is
ignored by both (a misspelt `think` or `top_k` would do nothing), and llama-server's base64 decoder
stops at the first character outside the alphabet, so base64 with line breaks (`base64` without
`-w0`) arrives as a picture cut short. Each check returns the decoded images, for comparison with
the files they came from.
"""

from __future__ import annotations

import base64
import binascii
import re

ROLES = ("system", "user", "assistant", "tool")
OLLAMA_FIELDS = {
    "model",
    "messages",
    "stream",
    "format",
    "keep_alive",
    "tools",
    "options",
    "think",
    "truncate",
    "shift",
    "logprobs",
    "top_logprobs",
}
OLLAMA_MESSAGE_FIELDS = {"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"}
OLLAMA_THINK_LEVELS = ("high", "medium", "low", "max")
# llama-server's OpenAI-compatible fields used by examples (server-task.cpp params_from_json_cmpl and
# server-common.cpp oaicompat_chat_params_parse); extend when an example uses another one.
OPENAI_FIELDS = {
    "model",
    "messages",
    "stream",
    "max_tokens",
    "n_predict",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "chat_template_kwargs",
    "reasoning_format",
    "reasoning_effort",
}
NUMBER_FIELDS = {"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
INT_FIELDS = {"top_k", "max_tokens", "n_predict", "seed"}
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64")


def strict_b64decode(s: object, where: str) -> bytes:
    """Standard alphabet, padded, nothing else (Go's base64.StdEncoding; what llama-server decodes whole)."""
    assert isinstance(s, str), f"{where}: expected a base64 string, got {type(s).__name__}"
    assert not s.startswith("data:"), f"{where}: a data: URL where plain base64 is expected"
    assert len(s) % 4 == 0 and re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", s), (
        f"{where}: not one line of padded standard base64 (line breaks, URL-safe alphabet or no padding?)"
    )
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise AssertionError(f"{where}: {e}") from None


def _known(obj: dict, fields: set[str], where: str) -> None:
    unknown = sorted(set(obj) - fields)
    assert not unknown, f"{where}: fields the server does not know (ignored without a word): {unknown}"


def _messages(req: dict) -> list[dict]:
    msgs = req.get("messages")
    assert isinstance(msgs, list) and msgs, "messages: expected a non-empty array"
    for i, m in enumerate(msgs):
        assert isinstance(m, dict), f"messages[{i}]: expected an object"
        assert m.get("role") in ROLES, f"messages[{i}].role: {m.get('role')!r} is not one of {ROLES}"
    return msgs


def check_ollama_chat(req: object) -> list[bytes]:
    """An Ollama /api/chat body; returns every message's images, decoded, in order."""
    assert isinstance(req, dict), "the body is not a JSON object"
    _known(req, OLLAMA_FIELDS, "request")
    assert isinstance(req.get("model"), str) and req["model"], "model: a model name is required"
    think = req.get("think", False)
    assert isinstance(think, bool) or think in OLLAMA_THINK_LEVELS, f"think: {think!r} is not a bool or a level"
    assert isinstance(req.get("stream", True), bool), "stream: expected a bool"
    assert isinstance(req.get("options", {}), dict), "options: expected an object"
    images = []
    for i, m in enumerate(_messages(req)):
        _known(m, OLLAMA_MESSAGE_FIELDS, f"messages[{i}]")
        assert isinstance(m.get("content", ""), str), f"messages[{i}].content: Ollama takes a string"
        imgs = m.get("images", [])
        assert isinstance(imgs, list), f"messages[{i}].images: expected a list of base64 strings"
        images += [strict_b64decode(s, f"messages[{i}].images[{j}]") for j, s in enumerate(imgs)]
    return images


def check_llama_server_chat(req: object) -> list[tuple[str, bytes]]:
    """A llama-server /v1/chat/completions body; returns (media type, decoded bytes) per image_url part."""
    assert isinstance(req, dict), "the body is not a JSON object"
    _known(req, OPENAI_FIELDS, "request")
    for k in NUMBER_FIELDS & set(req):
        assert isinstance(req[k], (int, float)) and not isinstance(req[k], bool), f"{k}: expected a number"
    for k in INT_FIELDS & set(req):
        assert isinstance(req[k], int) and not isinstance(req[k], bool), f"{k}: expected an integer"
    kwargs = req.get("chat_template_kwargs", {})
    assert isinstance(kwargs, dict), "chat_template_kwargs: expected an object"
    if "enable_thinking" in kwargs:
        assert isinstance(kwargs["enable_thinking"], bool), "chat_template_kwargs.enable_thinking: expected a bool"
    images = []
    for i, m in enumerate(_messages(req)):
        content = m.get("content")
        if isinstance(content, str):
            continue
        assert isinstance(content, list), f"messages[{i}].content: expected a string or an array of parts"
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            assert isinstance(part, dict), f"{where}: expected an object"
            if part.get("type") == "text":
                _known(part, {"type", "text"}, where)
                assert isinstance(part.get("text"), str), f"{where}.text: expected a string"
                continue
            assert part.get("type") == "image_url", f"{where}.type: {part.get('type')!r} is not text or image_url"
            _known(part, {"type", "image_url"}, where)
            url = part.get("image_url", {}).get("url")
            assert isinstance(url, str), f"{where}.image_url.url: expected a string"
            head, sep, data = url.partition(",")
            kind = _DATA_URL.fullmatch(head)
            assert sep and kind and "," not in data, (
                f"{where}.image_url.url: expected data:image/<type>;base64,<data>, got {url[:40]!r}..."
            )
            images.append((kind.group(1), strict_b64decode(data, f"{where}.image_url.url")))
    return images
