"""The HTTP front end: one FastAPI app serving the OpenAI API (/v1) and Ollama's (/api) over one
engine (engine.py), with the security defaults of docs/serving.md §5.

In front of every route, in this order: a loopback-bound server answers only requests addressed to
a loopback name (a web page cannot reach it through DNS rebinding, as Ollama does); with an API key,
every route but /health needs `Authorization: Bearer KEY` (or `X-Api-Key`); a body over
--max-body-mb is refused before it is read whole. Errors take the shape of the API the path
belongs to. The model loads after the server starts listening: /health says 503 "Loading model"
until it is ready, as llama-server's does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from minicpmv.runtime import ContextOverflowError
from minicpmv.session.limits import FLAGS, Limits

from . import ollama_api, openai_api
from .engine import Busy, Engine, Job
from .errors import APIError, context_exceeded
from .media import MediaLoader
from .model_info import ModelInfo

OLLAMA_VERSION = "0.12.0"  # what /api/version reports: Ollama clients gate features (think) on it
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class ServerState:
    limits: Limits
    loader: MediaLoader
    api_key: str | None = None
    loopback_only: bool = True
    engine: Engine | None = None  # None while the model loads
    info: ModelInfo | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, e: APIError) -> JSONResponse:
    return JSONResponse(e.ollama() if _is_ollama(path) else e.openai(), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: host check, API key, body size (see the module docstring)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fault = self._check(path, headers)
        if fault is not None:
            return await error_response(path, fault)(scope, receive, send)
        limit = self.state.limits.max_body_bytes
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await error_response(path, self._too_large())(scope, receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.state.loopback_only:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in LOOPBACK_NAMES:
                return APIError(403, f"this server answers only requests to localhost, not to {host!r}")
        key = self.state.api_key
        if key and path not in ("/health", "/v1/health"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY)")
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.state.limits.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is more than the limit of {self.state.limits.max_body_mb:g} MB ({FLAGS['max_body_mb']})",
        )


class _TooLarge(Exception):
    pass


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minicpm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.s = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(request.url.path, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return error_response(request.url.path, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        if state.load_error:
            raise APIError(503, f"the model failed to load: {state.load_error}")
        if state.engine is None:
            raise APIError(503, "Loading model")
        return {"status": "ok"}

    @app.get("/")
    async def root():
        return Response("minicpm-serve is running (OpenAI API: /v1, Ollama API: /api)\n", media_type="text/plain")

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        info = _info()
        return {
            "object": "list",
            "data": [
                {
                    "id": info.name,
                    "object": "model",
                    "created": int(info.modified),
                    "owned_by": "minicpmv",
                    "meta": info.meta(),
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        engine = _engine()
        req = await run_in_threadpool(openai_api.parse_chat_request, body, state.loader, state.limits)
        job = _submit(engine, req.msgs, req.opts)
        name = _info().name
        first = await _first_event(request, job)
        if not req.stream:
            answer = await _finish(request, job, first)
            return openai_api.completion(req, name, answer)
        writer = openai_api.ChunkWriter(req, name)

        async def events():
            try:
                yield writer.start()
                async for kind, value in _events(job, first):
                    if kind == "piece":
                        text = writer.piece(value)
                        if text:
                            yield text
                    elif kind == "done":
                        yield writer.end(value)
                    else:  # a failure after the answer started: an error event (openai-python raises it)
                        yield openai_api.sse(_as_api_error(value).openai())
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        return await _ollama(request, ollama_api.parse_chat, ollama_api.chat_piece, ollama_api.chat_final)

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        return await _ollama(request, ollama_api.parse_generate, ollama_api.generate_piece, ollama_api.generate_final)

    @app.get("/api/tags")
    async def tags():
        return {"models": [_info().tag()]}

    @app.post("/api/show")
    async def show(request: Request):
        await _json(request)
        return _info().show()

    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION}

    # -- helpers -------------------------------------------------------------------------------

    def _engine() -> Engine:
        if state.engine is None:
            raise APIError(503, state.load_error or "Loading model", headers={"Retry-After": "5"})
        return state.engine

    def _info() -> ModelInfo:
        _engine()
        return state.info

    async def _ollama(request: Request, parse, piece_json, final_json):
        body = await _json(request)
        engine = _engine()
        msgs, opts = await run_in_threadpool(parse, body, state.loader, state.limits)
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", "stream")
        t0 = time.perf_counter()
        job = _submit(engine, msgs, opts)
        name = str(body.get("model") or _info().name)
        first = await _first_event(request, job)
        if not stream:
            answer = await _finish(request, job, first)
            return final_json(name, answer, opts.think, time.perf_counter() - t0, False)

        async def lines():
            pieces = ollama_api.PieceLines(name, piece_json)
            try:
                async for kind, value in _events(job, first):
                    if kind == "piece":
                        if (line := pieces.line(value)) is not None:
                            yield line
                    elif kind == "done":
                        yield ollama_api.ndjson(final_json(name, value, opts.think, time.perf_counter() - t0, True))
                    else:
                        yield ollama_api.ndjson(_as_api_error(value).ollama())
            finally:
                job.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def _submit(engine: Engine, msgs: list[dict], opts) -> Job:
    job = Job(msgs, opts)
    try:
        engine.submit(job)
    except Busy as e:
        raise APIError(503, f"the server is busy: {e}; try again shortly", headers={"Retry-After": "5"}) from None
    return job


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body is already read: the next message the
    server receives is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _first_event(request: Request, job: Job) -> tuple[str, object]:
    """The job's first event, or its error as the response's status (nothing has been sent yet);
    a client that leaves while the job waits or runs cancels it."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        kind, value = await job.next()
    finally:
        watcher.cancel()
    if kind == "error":
        raise _as_api_error(value)
    return kind, value


async def _events(job: Job, first):
    kind, value = first
    while True:
        yield kind, value
        if kind in ("done", "error"):
            return
        kind, value = await job.next()


async def _finish(request: Request, job: Job, first):
    """Wait for the whole answer (non-streamed request), cancelling it if the client goes away."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        async for kind, value in _events(job, first):
            if kind == "done":
                return value
            if kind == "error":
                raise _as_api_error(value)
    finally:
        watcher.cancel()


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ContextOverflowError):
        return context_exceeded(msg)
    if isinstance(e, ValueError):  # the conversation or its media (PromptError, ImageError, VideoError)
        return APIError(400, msg)
    return APIError(500, msg)


def served_name(model_path: Path, alias: str | None) -> str:
    return alias or Path(model_path).stem
