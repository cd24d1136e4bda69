"""Errors a request can get, in each API's shape.

OpenAI (and llama-server, vLLM): `{"error": {"message", "type", "param", "code"}}` with `code` the
HTTP status; Ollama: `{"error": "message"}`. A request's fault is always a 4xx: the `openai`
client retries 5xx responses twice, so a bad request answered with a 5xx would run three times
(docs/serving.md §4). Messages are one line.
"""

from __future__ import annotations

from dataclasses import dataclass

# status -> the OpenAI-style error type llama-server uses for it
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    type: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.message = " ".join(str(self.message).split())
        super().__init__(self.message)

    def openai(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type or TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.status,
            }
        }

    def ollama(self) -> dict:
        return {"error": self.message}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def context_exceeded(message: str) -> APIError:
    return APIError(400, message, "messages", "exceed_context_size_error")
