"""llama.cpp's process-wide state: errors, the log, the backend, and freeing handles.

llama-cpp-python installs a log callback at import that prints everything; `init_backend` replaces it
with ours, which keeps the recent lines (a failed call's message quotes them) and prints them only
when asked (verbose=True: info and up; "debug": every line).
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections import deque

import llama_cpp as ll


class LlamaError(RuntimeError):
    """A llama.cpp call failed; the message is one line."""


class ContextOverflowError(LlamaError):
    """The prompt (plus the tokens to generate) does not fit in the context window."""


_log_state = {"verbose": False, "init": False, "last": 0}
_LOG_DEBUG, _LOG_CONT = 1, 5  # enum ggml_log_level (ggml.h)
_log_tail: deque[str] = deque(maxlen=200)  # recent non-debug lines, for error messages


@ll.llama_log_callback
def log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # debug lines come per decode call and would slow generation: kept only with verbose="debug"
    if level != _LOG_CONT:
        _log_state["last"] = level
    if not text or (_log_state["last"] == _LOG_DEBUG and _log_state["verbose"] != "debug"):
        return
    line = text.decode("utf-8", errors="replace")
    _log_tail.append(line)
    if _log_state["verbose"]:
        sys.stderr.write(line)
        sys.stderr.flush()


def recent_log(n: int = 20) -> str:
    """The last `n` lines llama.cpp (or mtmd) logged, debug lines left out: what a failed call said."""
    return "".join(list(_log_tail)[-n:])


def clear_log() -> None:
    """Forget the kept lines (before a call whose failure should quote only its own)."""
    _log_tail.clear()


def load_error() -> str | None:
    """What llama.cpp logged as the reason a model load failed ("tensor 'blk.0.attn_k.weight' not
    found"); None if it said nothing."""
    for line in reversed(_log_tail):
        _, sep, reason = line.partition("error loading model: ")
        if sep:
            return re.sub(r"^[a-z_]+: ", "", " ".join(reason.split())) or None  # drop the C function name
    return None


def init_backend(verbose: bool | str = False) -> None:
    """Route llama.cpp's log through us and initialise the backend once."""
    _log_state["verbose"] = verbose
    ll.llama_log_set(log_callback, ctypes.c_void_p(0))
    backend_init()


def backend_init() -> None:
    """llama_backend_init, once per process (the log is left as it is)."""
    if not _log_state["init"]:
        ll.llama_backend_init()
        _log_state["init"] = True


def release(obj, attr: str, free) -> None:
    """Free the llama.cpp handle held in `obj.<attr>` once (close() and __del__ may both run, and
    __init__ may have failed before setting it)."""
    handle = getattr(obj, attr, None)
    if handle:
        free(handle)
        setattr(obj, attr, None)
