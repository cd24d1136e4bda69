"""The model behind the HTTP API, two ways: `Engine` (--parallel 1) answers queued requests one at a
time, as llama-server's task queue feeds one slot; `BatchEngine` (--parallel N) answers up to N at
once, decoded together by runtime/batch.py (llama-server's parallel slots).

Engine: Keeping one thread on the model keeps
the KV cache holding the last conversation, so a follow-up request (an OpenAI client resends the
whole conversation) decodes only its new tokens, and the vision cache serves images seen before.
While no request waits, the answer is decoded into the cache as the follow-up will resend it
(runtime/next_turn.py); BatchChat does the same per slot.

A handler submits a `Job` and reads its events as they come (`await job.next()`): ("piece", Piece),
then ("done", Answer) or ("error", exception). A job is cancelled (the client went away) with
`job.cancel()`: the worker stops it before its next piece, and a job cancelled while waiting never
starts. At most `max_queue` jobs wait; beyond that `submit` raises Busy.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from minicpmv.runtime import ContextOverflowError, MiniCPMV, next_turn
from minicpmv.runtime.batch import BatchChat, BatchRequest
from minicpmv.runtime.results import Answer
from minicpmv.session.options import ChatOptions

log = logging.getLogger("minicpmv.server")


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    msgs: list[dict]
    opts: ChatOptions
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        """From the worker thread to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled.set()

    async def next(self) -> tuple[str, object]:
        return await self.events.get()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model: MiniCPMV, max_queue: int):
        self.model = model
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # jobs in the queue
        self._answering = False  # the worker is answering a job (not idle or warming)
        self.answered = 0  # jobs finished (done, failed or cancelled once started)
        self._worker = threading.Thread(target=self._run, name="minicpm-engine", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            # while the worker is not answering (idle, or warming a follow-up for at most one chunk), the
            # first job in the queue is the next one answered, not one that waits
            if self._waiting >= self.max_queue + (0 if self._answering else 1):
                raise Busy(f"{self.max_queue} requests are waiting, the most this server queues (--max-queue)")
            self._waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._answering = not job.cancelled.is_set()
            if not self._answering:
                continue
            job.started.set()
            try:
                answer = self._answer(job)
            finally:
                self.answered += 1
                with self._lock:
                    self._answering = False
            if answer is not None and self._queue.empty():
                self._warm(job, answer)

    def _answer(self, job: Job) -> Answer | None:
        try:
            stream = self.model.chat(job.msgs, stream=True, **job.opts.chat_kwargs())
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers with its status
            job.emit("error", e)
            return None
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    return None
                if piece:
                    job.emit("piece", piece)
            job.emit("done", stream.result)
            return stream.result
        except Exception as e:  # noqa: BLE001
            job.emit("error", e)
            return None
        finally:
            stream.close()  # a cancelled answer gives the model back at once

    def _warm(self, job: Job, answer: Answer) -> None:
        """While nothing waits: the conversation as its next request will resend it, into the KV
        cache (runtime/next_turn.py), so a follow-up decodes only its new message."""
        try:
            next_turn.warm(
                self.model, job.msgs, str(answer), job.opts.chat_kwargs(), stop=lambda: not self._queue.empty()
            )
        except Exception as e:  # noqa: BLE001 - an optimisation: the next request decodes what it needs
            log.warning("warming the next turn's prefix failed: %s", e)


class BatchEngine:
    """N slots decoded together (runtime/batch.py) by one thread that steps the batch; a job is a
    slot's request. The model's turn is held for the engine's lifetime (nothing else may use it).
    At most `max_queue` jobs wait for a free slot."""

    IDLE_WAIT_S = 0.05  # the loop's nap when there is nothing to decode (encoding, or no work)

    def __init__(self, model: MiniCPMV, n_seq: int, n_ctx_seq: int, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self._hold = model._turn.acquire()
        self.batch = BatchChat(model, n_seq, n_ctx_seq, follow_ups=True)
        self._wake = threading.Event()
        self._closing = False
        self.answered = 0
        self._worker = threading.Thread(target=self._run, name="minicpm-batch", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self.batch.waiting

    def submit(self, job: Job) -> None:
        # requests not yet admitted that a free slot will take at the next step do not wait
        if self.batch.waiting - self.batch.free_slots >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are waiting, the most this server queues (--max-queue)")

        def done(req: BatchRequest) -> None:
            self.answered += 1
            if isinstance(req.error, ContextOverflowError):  # name the server's knobs
                n = len(self.batch.slots)
                job.emit(
                    "error",
                    ContextOverflowError(
                        f"{req.error}; each of the {n} slots holds --ctx positions: "
                        "start the server with a larger --ctx, or --parallel 1"
                    ),
                )
            elif req.error is not None:
                job.emit("error", req.error)
            elif req.answer is not None:
                job.emit("done", req.answer)

        req = BatchRequest(
            job.msgs,
            job.opts.chat_kwargs(),
            on_piece=lambda p: p and job.emit("piece", p),
            on_done=done,
            cancelled=job.cancelled,
        )
        self.batch.submit(req)
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._worker.join(timeout=30)
        self.batch.close()
        self._hold.release()

    def _run(self) -> None:
        while not self._closing:
            try:
                worked = self.batch.step()
            except Exception as e:  # noqa: BLE001 - a failed decode: every request in flight fails
                for s in self.batch.slots:
                    if s.req is not None:
                        self.batch._end(s, error=e)
                continue
            if not worked or not any(s.state in ("generating", "prefilling") for s in self.batch.slots):
                self._wake.wait(self.IDLE_WAIT_S)
                self._wake.clear()
