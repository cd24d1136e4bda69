"""Streaming GGUF writer: header and tensor infos first, then tensor data in row blocks.

Memory stays bounded by a block of rows (plus the block being prepared in the background), not by
the model or even the largest tensor: a block is read from the checkpoint, encoded, written and
dropped. Files are written under temporary names and renamed together at the end (OutputSet), so
a failure never leaves a half-written output.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGUFWriter

from .plan import TensorPlan

Encoder = Callable[[np.ndarray, TensorPlan], np.ndarray]  # f32 rows -> uint8 [n_rows, row_bytes]

BLOCK_ELEMENTS = 1 << 25  # 32 Mi elements (128 MiB as f32) per streamed block
WAIT_S = 0.1  # longest wait of a stage, and of the caller for its next block, before looking again (_blocks)


class OutputExistsError(FileExistsError):
    pass


# Files being written are named `.minicpmv-partial.<pid>.<final name>` until they are complete, so
# that a later run can tell leftovers of a killed process from anything else in the folder.
TEMP_PREFIX = ".minicpmv-partial."
_TEMP_RE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)\.(.+)")
_LEGACY_TEMP_RE = re.compile(r"\.(.+\.gguf|Modelfile)\.(\d+)\.tmp")  # before TEMP_PREFIX existed


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: output exists (use --force to overwrite)")


def temp_path(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}.{path.name}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(folder: Path) -> tuple[int, int]:
    """Delete temporary files in `folder` left by conversions whose process is gone.
    Returns (files removed, bytes freed)."""
    n = freed = 0
    if not Path(folder).is_dir():
        return 0, 0
    for f in Path(folder).iterdir():
        m = _TEMP_RE.fullmatch(f.name)
        pid = int(m.group(1)) if m else None
        if m is None:
            m = _LEGACY_TEMP_RE.fullmatch(f.name)
            pid = int(m.group(2)) if m else None
        if pid is None or pid == os.getpid() or _pid_alive(pid) or not f.is_file():
            continue
        size = f.stat().st_size
        f.unlink(missing_ok=True)
        n, freed = n + 1, freed + size
    return n, freed


class OutputSet:
    """The files of one run, each written under a temporary name and all renamed at the end:
    a run leaves the complete set or nothing (an existing file replaced with --force stays as it
    was until the new set is complete). Use as a context manager; any exception, Ctrl-C or a
    signal turned into an exception (cli/convert.py) discards the temporary files."""

    def __init__(self, force: bool = False):
        self.force = force
        self.files: list[tuple[Path, Path]] = []  # (temporary, final)

    def add(self, final: Path) -> Path:
        """Register `final` (refused if it exists without force); returns the path to write."""
        final = Path(final)
        check_output(final, self.force)
        tmp = temp_path(final)
        self.files.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.files:
            os.replace(tmp, final)
        self.files = []

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        self.files = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[GGUFWriter], None],
    plans: list[TensorPlan],
    encode: Encoder,
    *,
    force: bool = False,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> Path:
    """Write `plans` to `path` (atomic). `on_tensor` is called after each tensor (progress)."""
    with OutputSet(force) as outs:
        write_gguf_file(outs.add(path), arch, add_metadata, plans, encode, on_tensor=on_tensor)
    return Path(path)


def write_gguf_file(
    path: Path,
    arch: str,
    add_metadata: Callable[[GGUFWriter], None],
    plans: list[TensorPlan],
    encode: Encoder,
    *,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> None:
    """Write `plans` to `path` as it goes (callers write to a temporary name: OutputSet)."""
    w = GGUFWriter(path, arch, use_temp_file=False)
    add_metadata(w)
    for p in plans:
        w.add_tensor_info(
            p.name, (p.n_rows, p.nbytes // max(p.n_rows, 1)), np.dtype(np.uint8), p.nbytes, raw_dtype=p.ggml_type
        )
        # GGUFWriter derived ne from the byte shape; store the logical shape (the 4-D patch
        # embedding keeps all its dims). GGUF stores ne, the reversed numpy shape.
        w.tensors[-1][p.name].shape = list(p.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    written: dict[str, int] = {}
    try:
        for p, block, last in _blocks(plans, encode):
            if p.name not in written:
                w.write_padding(fout, fout.tell())
                written[p.name] = 0
            fout.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            written[p.name] += block.nbytes
            if last:
                if written[p.name] != p.nbytes:
                    raise ValueError(f"tensor {p.name}: encoded {written[p.name]} bytes, expected {p.nbytes}")
                w.write_padding(fout, p.nbytes)
                if on_tensor:
                    on_tensor(p)
    finally:
        w.close()


def _row_blocks(p: TensorPlan) -> Iterator[tuple[np.ndarray, bool]]:
    """The tensor as f32 [rows, row_len] blocks; whole when it has no row loader."""
    if p.load_rows is None or p.n_elements <= BLOCK_ELEMENTS:
        x = p.load()
        if tuple(x.shape) != tuple(p.shape):
            raise ValueError(f"tensor {p.name} ({p.source}): shape {tuple(x.shape)}, expected {p.shape}")
        yield x.reshape(-1, p.row_len) if p.shape else x.reshape(1, 1), True
        return
    step = max(1, BLOCK_ELEMENTS // p.row_len)
    for a in range(0, p.n_rows, step):
        b = min(p.n_rows, a + step)
        yield p.load_rows(a, b), b == p.n_rows


def _blocks(plans: list[TensorPlan], encode: Encoder) -> Iterator[tuple[TensorPlan, np.ndarray, bool]]:
    """Three stages run at once: a reader thread loads block i+2 (I/O), an encoder thread
    quantizes block i+1 (on its own worker threads), and the caller writes block i.

    Every wait is short (WAIT_S). The kernel may hand a signal (Ctrl-C, SIGTERM) to any thread, and
    Python runs its handler only when the main thread next executes: a main thread blocked on an
    empty queue until the next block is encoded would answer a Ctrl-C seconds later, or never if
    that block never comes. And once the caller stops asking (an error, an interrupt), the stages
    see `stop` and end on their own: nobody waits for the block being encoded."""
    read_q: queue.Queue = queue.Queue(maxsize=1)
    out_q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                pass
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=WAIT_S)
            except queue.Empty:
                pass
        return None

    def reader():
        try:
            for p in plans:
                for x, last in _row_blocks(p):
                    if not put(read_q, (p, x, last)):
                        return
            put(read_q, None)
        except BaseException as e:  # hand the error on
            put(read_q, e)

    def encoder():
        while True:
            item = get(read_q)
            if item is None or isinstance(item, BaseException):
                put(out_q, item)
                return
            p, x, last = item
            try:
                data = encode(x, p)
            except BaseException as e:
                put(out_q, e)
                return
            if not put(out_q, (p, data, last)):
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, encoder)]
    try:
        for t in threads:
            t.start()
        while True:
            item = get(out_q)
            if item is None:  # all written: both stages have ended or are ending
                for t in threads:
                    t.join()
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
