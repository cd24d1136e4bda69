"""One thread of the process runs the OpenMP work: llama.cpp's graphs and torch's operators.

torch's wheel and llama-cpp-python's libggml-cpu both ask for `libgomp.so.1`, and the dynamic loader
gives them the one torch loaded first, so the two share one OpenMP runtime. In libgomp every thread
that starts a parallel region gets a team of its own, whose worker threads count as "managed" until
the starting thread exits; once more threads are managed than the process may use CPUs, every wait
at a barrier spins 100 times instead of 300,000 and then sleeps on a futex (libgomp's wait.h,
`gomp_throttled_spin_count_var`; env.c sets both counts). llama.cpp meets at a barrier after every
graph node, so from then on each one is a sleep and a wake-up: measured on an Intel Xeon with AMX,
2 threads, the full-size Q4_K_M, a 64-token greedy story decoded at 4.17 tok/s from the thread that
had loaded the model and at 3.72 tok/s from any other thread (or from it once a bf16 image encode
had left attention worker threads alive, as the encoder once had: ~46,000 voluntary context
switches over 96 tokens instead of 3). docs/architecture.md §3, "One OpenMP thread".

So the runtime sends that work here (`run`): one long-lived thread, whatever thread the front end
calls from (the CLI's main thread, the server's workers, Gradio's thread pool). Work that must run
beside it (BatchChat's vision encode while the other streams decode) runs on threads that exit
when it is done (`side_thread`), which takes their teams away again.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

_local = threading.local()  # .allowed: this thread may run OpenMP work itself
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _mark_allowed() -> None:
    _local.allowed = True


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="minicpmv-compute", initializer=_mark_allowed)
        return _pool


def _forget_after_fork() -> None:  # a forked child has no compute thread, only the parent's object
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def on_compute_thread() -> bool:
    """True on the compute thread and on side threads (where `run` calls straight through)."""
    return getattr(_local, "allowed", False)


def run(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the compute thread, waiting for it; exceptions come back as they were.
    Called from the compute thread or a side thread, it just calls fn. A KeyboardInterrupt while
    waiting lets the running call finish first (as it would have in the caller's own thread: a
    llama_decode cannot be stopped half-way), then is raised."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    fut = _executor().submit(fn, *args, **kwargs)
    try:
        return fut.result()
    except KeyboardInterrupt:
        if not fut.cancel():
            try:
                fut.exception()  # wait for the call in flight; its result is dropped
            except KeyboardInterrupt:
                pass
        raise


def side_thread(fn: Callable[..., T], /, *args, name: str = "minicpmv-side", **kwargs) -> Future:
    """Start fn(*args, **kwargs) on a new thread that may run OpenMP work itself and exits when fn
    returns (so its OpenMP team goes with it); the Future carries the result or the exception."""
    fut: Future = Future()

    def body() -> None:
        _mark_allowed()
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the Future
            fut.set_exception(e)

    threading.Thread(target=body, name=name, daemon=True).start()
    return fut
