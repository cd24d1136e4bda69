"""One MiniCPMV called from several threads (issue 20): calls are served one at a time, each answer
is the one the same call gives alone, and a stream keeps the model's turn until it is exhausted,
closed or freed (runtime/turn.py).

The oracle is the same call made alone on a cleared cache, greedy. The model uses a float32 KV cache
without flash attention, so logits do not depend on how positions were batched or which prefix was
reused (docs/pitfalls.md §6 for the default precision); greedy answers then match token for token
and prefill logits to float32 rounding.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from .helpers import load_exact
from .test_runtime_chat import picture

TOKENS = 10
CALLS = [
    [{"role": "user", "content": [picture(448, 448, seed=1), "What is in the picture?"]}],
    [{"role": "user", "content": "Count to ten."}],
    [{"role": "user", "content": [picture(672, 448, seed=2), "Describe the colours."]}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "user", "content": [picture(448, 448, seed=3), "Is it dark?"]},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Why not?"},
    ],
    [{"role": "user", "content": "Name three colours."}],
]


@pytest.fixture(scope="module")
def model(files):
    m = load_exact(*files, n_ctx=2048)
    yield m
    m.close()


@pytest.fixture(scope="module")
def alone(model):
    """Per call: the greedy tokens and the prefill logits of that call made alone."""
    out = []
    for msgs in CALLS:
        model.reset()
        tokens = model.chat(msgs, greedy=True, max_new_tokens=TOKENS).tokens
        model.reset()
        out.append((tokens, model.prefill(msgs)))
    model.reset()
    return out


def ask(model, msgs):
    return model.chat(msgs, greedy=True, max_new_tokens=TOKENS).tokens


def ask_streaming(model, msgs):
    s = model.chat(msgs, greedy=True, max_new_tokens=TOKENS, stream=True)
    for _ in s:
        time.sleep(0.002)  # slow reader: the others must wait for this stream, not slip in
    return s.result.tokens


def run_threads(fns: list) -> list:
    """Run the callables on their own threads, started together; their results (or exceptions)."""
    results: list = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def work(i):
        start.wait()
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    return results


def test_threads_get_the_answers_they_get_alone(model, alone):
    for round_ in range(3):  # different interleavings: which thread wins the turn varies
        fns = []
        for i, msgs in enumerate(CALLS):
            kind = (i + round_) % 3
            fns.append(
                (lambda m=msgs: ("chat", ask(model, m)))
                if kind == 0
                else (lambda m=msgs: ("stream", ask_streaming(model, m)))
                if kind == 1
                else (lambda m=msgs: ("prefill", model.prefill(m)))
            )
        for i, r in enumerate(run_threads(fns)):
            assert not isinstance(r, BaseException), f"call {i}: {r!r}"
            kind, value = r
            tokens, logits = alone[i]
            if kind == "prefill":
                assert float(np.abs(value - logits).max() / np.ptp(logits)) < 1e-5, f"call {i}"
            else:
                assert value == tokens, f"call {i} ({kind}) in round {round_}"
    assert not model.busy


def test_a_stream_keeps_the_turn_until_it_is_exhausted(model, alone):
    order = []
    s = model.chat(CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True)
    first = next(s)
    other = threading.Thread(target=lambda: order.append(("other", ask(model, CALLS[3]))))
    other.start()
    other.join(0.5)
    assert other.is_alive() and model.busy  # waiting for the stream's turn
    rest = list(s)
    order.append(("stream", s.result.tokens))
    other.join(300)
    assert [k for k, _ in order] == ["stream", "other"]
    assert first + "".join(rest) == model.lm.detokenize(s.result.tokens)
    assert order[0][1] == alone[1][0] and order[1][1] == alone[3][0]
    assert not model.busy


def test_close_gives_the_turn_back(model, alone):
    s = model.chat(CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True)
    next(s)
    got = []
    other = threading.Thread(target=lambda: got.append(ask(model, CALLS[5])))
    other.start()
    other.join(0.5)
    assert other.is_alive()
    s.close()
    other.join(300)
    assert got == [alone[5][0]]
    assert s.closed and s.result is None and s.stats.decode_tokens >= 1  # the generator's cleanup ran
    assert list(s) == []
    s.close()  # twice is fine


def test_close_from_another_thread_ends_the_reader(model):
    s = model.chat(CALLS[3], greedy=True, max_new_tokens=200, stream=True)
    read = []
    reader_started = threading.Event()

    def reader():
        for p in s:
            read.append(p)
            reader_started.set()
            time.sleep(0.01)

    t = threading.Thread(target=reader)
    t.start()
    assert reader_started.wait(60)
    s.close()
    t.join(60)
    assert not t.is_alive() and s.closed and not model.busy
    assert 0 < len(read) < 200 and s.result is None


def test_a_dropped_stream_gives_the_turn_back(model, alone):
    def start_and_drop():
        s = model.chat(CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True)
        next(s)
        return s.stats

    stats = start_and_drop()
    # freed by reference counting when the function returned: the finalizer ended it
    assert not model.busy and stats.decode_tokens >= 1
    got = run_threads([lambda: ask(model, CALLS[5])])
    assert got == [alone[5][0]]


def test_a_stream_lost_in_a_reference_cycle_does_not_hold_the_model_forever(model, alone):
    gc.collect()
    gc.disable()  # only the waiting caller's own collection may free the stream
    try:
        s = model.chat(CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True)
        next(s)
        cycle: list = [s]
        cycle.append(cycle)
        del s, cycle
        assert model.busy  # unreachable but not freed: no collection has run
        got = run_threads([lambda: ask(model, CALLS[3])])
    finally:
        gc.enable()
    assert got == [alone[3][0]] and not model.busy


def test_streams_read_from_any_worker_of_a_pool_keep_their_turn(model, alone):
    """Ownership is the stream's, not the thread's (issue 28): two streams and a blocking call
    whose next() calls land on arbitrary workers of a pool. The second stream and the call wait
    for the first stream; none is taken over, and every answer is the one it gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(model.chat, CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True).result()
        b_fut = pool.submit(model.chat, CALLS[3], greedy=True, max_new_tokens=TOKENS, stream=True)
        c_fut = pool.submit(ask, model, CALLS[5])
        pieces = []
        while (p := pool.submit(next, a, None).result()) is not None:  # any worker, one piece each
            pieces.append(p)
        b = b_fut.result(300)
        b_pieces = []
        while (p := pool.submit(next, b, None).result()) is not None:
            b_pieces.append(p)
        assert a.result.tokens == alone[1][0] and b.result.tokens == alone[3][0]
        assert "".join(pieces).strip() == str(a.result) and "".join(b_pieces).strip() == str(b.result)
        assert c_fut.result(300) == alone[5][0]
    assert not model.busy


def test_asyncio_server_pattern_one_next_per_threadpool_call(model, alone):
    """What a FastAPI/Starlette handler does: each next() of a stream in run_in_threadpool, several
    requests at once on one event loop. Each stream answers as alone."""
    import asyncio

    from starlette.concurrency import run_in_threadpool

    async def request(msgs):
        s = await run_in_threadpool(lambda: model.chat(msgs, greedy=True, max_new_tokens=TOKENS, stream=True))
        while (await run_in_threadpool(next, s, None)) is not None:
            await asyncio.sleep(0)
        return s.result.tokens

    async def main():
        return await asyncio.gather(*(request(CALLS[i]) for i in (1, 3, 5, 0)))

    assert asyncio.run(main()) == [alone[i][0] for i in (1, 3, 5, 0)]
    assert not model.busy


def test_a_caller_behind_its_own_abandoned_stream_is_warned(model, alone, monkeypatch):
    """A stream still referenced but not read holds the model; the thread that read it last and
    now waits is told why (in single-threaded code the wait would never end: close() it)."""
    import minicpmv.runtime.turn as turn

    monkeypatch.setattr(turn, "WARN_S", 0.2)
    s = model.chat(CALLS[1], greedy=True, max_new_tokens=TOKENS, stream=True)
    next(s)
    threading.Timer(1.0, s.close).start()  # stands in for the user noticing the warning
    with pytest.warns(RuntimeWarning, match="unfinished chat\\(\\) stream that this thread read last"):
        assert ask(model, CALLS[5]) == alone[5][0]
    assert s.closed and not model.busy
