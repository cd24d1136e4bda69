"""One model, one caller at a time: the lock around the KV cache and the llama.cpp context.

`MiniCPMV.chat()`, `prefill()`, `reset()` and `close()` take the model's turn for the length of the
call; a streamed chat() hands its turn to the `ChatStream`, which keeps it until it is exhausted,
closed or freed. Callers on other threads wait their turn, so every answer is the one the same call
gives alone (the KV cache only ever holds one caller's conversation at a time).

A call from the thread that is consuming an unfinished stream does not wait for itself: it ends that
stream (resuming it raises StaleStreamError) and goes on, so single-threaded code that breaks out of
a stream and asks again works as it always did.

A stream dropped without close() is freed at once by reference counting (ChatStream keeps no
reference cycle) and its finalizer gives the turn back. One caught in a reference cycle of the
caller's making waits for the garbage collector; a caller waiting behind a stream that has not been
read from for a while runs the collector itself (at growing intervals), so such a stream cannot hold
the model forever.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from typing import Iterator

IDLE_COLLECT_S = 1.0     # first garbage collection by a waiter behind an idle stream
MAX_COLLECT_S = 30.0     # then at doubling intervals up to this


class Hold:
    """One caller's turn. `stream` holds are kept by a ChatStream across calls; `thread` is then the
    thread that last read from it, `ended` turns True when that thread's next call took over."""

    def __init__(self, lock: "TurnLock", stream: bool):
        self.lock, self.stream = lock, stream
        self.thread = threading.get_ident()
        self.last_read = time.monotonic()
        self.ended = False

    def touch(self) -> None:
        """The stream is being read, by the calling thread."""
        self.thread = threading.get_ident()
        self.last_read = time.monotonic()

    def release(self) -> None:
        """Give the turn back (nothing if it was taken over or given back already)."""
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
            interval, waited_for = IDLE_COLLECT_S, None
            while (h := self._holder) is not None:
                if h.thread == me:
                    if not h.stream:
                        raise RuntimeError("a MiniCPMV call was made from inside another call on the same model")
                    h.ended = True   # this thread's own unfinished stream: take over
                    break
                if h is not waited_for:
                    interval, waited_for = IDLE_COLLECT_S, h
                if not self._cond.wait(timeout=interval) and h is self._holder and h.stream \
                        and time.monotonic() - h.last_read >= interval:
                    gc.collect()   # a dropped stream in a reference cycle gives the turn back here
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
