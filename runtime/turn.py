"""One model, one caller at a time: the lock around the KV cache and the llama.cpp context.

`MiniCPMV.chat()`, `prefill()`, `reset()` and `close()` take the model's turn for the length of the
call; a streamed chat() hands its turn to the `ChatStream`, which keeps it until it is exhausted,
closed or freed, whichever thread reads it: a server may call each `next()` on any worker of a pool.
Other callers wait their turn, so every answer is the one the same call gives alone (the KV cache
only ever holds one caller's conversation at a time).

A stream dropped without close() is freed at once by reference counting (ChatStream keeps no
reference cycle) and its finalizer gives the turn back; `for piece in model.chat(..., stream=True):
break` therefore frees the model. One caught in a reference cycle of the caller's making waits for
the garbage collector; a caller waiting behind a stream that has not been read from for a while runs
the collector itself (at growing intervals), so such a stream cannot hold the model forever. A stream
still referenced but no longer read holds the model until it is closed: a caller that waits behind
one it read itself last gets a RuntimeWarning saying so (in single-threaded code that wait never
ends; close() the stream, or use it in a `with` block).
"""

from __future__ import annotations

import gc
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

IDLE_COLLECT_S = 1.0  # first garbage collection by a waiter behind an idle stream
MAX_COLLECT_S = 30.0  # then at doubling intervals up to this
WARN_S = 5.0  # a waiter behind a stream it read last itself is warned after this


class Hold:
    """One caller's turn. `stream` holds are kept by a ChatStream across calls; `reader` is the
    thread that last read from it (for the warning only: ownership is the stream's)."""

    def __init__(self, lock: "TurnLock", stream: bool):
        self.lock, self.stream = lock, stream
        self.reader = threading.get_ident()
        self.last_read = time.monotonic()

    def touch(self) -> None:
        """The stream is being read, by the calling thread."""
        self.reader = threading.get_ident()
        self.last_read = time.monotonic()

    def release(self) -> None:
        """Give the turn back (nothing if it was given back already)."""
        self.lock._release(self)


class TurnLock:
    def __init__(self) -> None:
        # re-entrant: a stream's finalizer may run (garbage collection) on a thread inside acquire()
        self._cond = threading.Condition(threading.RLock())
        self._holder: Hold | None = None

    @property
    def busy(self) -> bool:
        return self._holder is not None

    def acquire(self, stream: bool = False) -> Hold:
        """Wait for the turn (see the module docstring) and take it."""
        me = threading.get_ident()
        with self._cond:
            interval, waited_for, warned = IDLE_COLLECT_S, None, False
            t0 = time.monotonic()
            while (h := self._holder) is not None:
                if not h.stream and h.reader == me:
                    raise RuntimeError("a MiniCPMV call was made from inside another call on the same model")
                if h is not waited_for:
                    interval, waited_for, t0 = IDLE_COLLECT_S, h, time.monotonic()
                if h.stream and h.reader == me and not warned and time.monotonic() - max(t0, h.last_read) >= WARN_S:
                    warned = True
                    warnings.warn(
                        "waiting for an unfinished chat() stream that this thread read last: "
                        "close() it (or use it in a `with` block) if it is abandoned",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                if (
                    not self._cond.wait(timeout=min(interval, WARN_S))
                    and h is self._holder
                    and h.stream
                    and time.monotonic() - h.last_read >= interval
                ):
                    gc.collect()  # a dropped stream in a reference cycle gives the turn back here
                    interval = min(2 * interval, MAX_COLLECT_S)
            self._holder = Hold(self, stream)
            return self._holder

    def _release(self, hold: Hold) -> None:
        with self._cond:
            if self._holder is hold:
                self._holder = None
                self._cond.notify_all()

    @contextmanager
    def call(self) -> Iterator[Hold]:
        """The turn for one blocking call."""
        hold = self.acquire()
        try:
            yield hold
        finally:
            hold.release()
