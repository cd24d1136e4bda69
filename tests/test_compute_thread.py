"""One OpenMP thread (runtime/compute_thread.py): the runtime's llama.cpp and torch work runs on one
thread whatever thread calls it, side threads exit when done, and so libgomp never throttles the
barriers of llama.cpp's decode. The throttling shows as voluntary context switches (a sleep on a
futex at each graph barrier instead of a spin), counted in a fresh process: numbers, not seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from minicpmv.runtime import compute_thread


def test_run_uses_one_thread_from_any_caller_and_returns_or_raises():
    idents = set()

    def where() -> int:
        idents.add(threading.get_ident())
        assert compute_thread.on_compute_thread()
        return compute_thread.run(threading.get_ident)  # nested: runs straight through

    with ThreadPoolExecutor(3) as callers:
        got = list(callers.map(lambda _: compute_thread.run(where), range(9)))
    got.append(compute_thread.run(where))
    assert len(idents) == 1 and set(got) == idents
    assert threading.get_ident() not in idents and not compute_thread.on_compute_thread()
    with pytest.raises(ZeroDivisionError):
        compute_thread.run(lambda: 1 / 0)
    assert compute_thread.run(lambda a, b=0: a + b, 2, b=3) == 5  # still serving after an exception


def test_side_thread_runs_there_may_compute_and_exits():
    seen = {}

    def job(x):
        seen["thread"] = threading.current_thread()
        seen["allowed"] = compute_thread.on_compute_thread()
        seen["inline"] = compute_thread.run(threading.get_ident) == threading.get_ident()
        return x * 2

    fut = compute_thread.side_thread(job, 21, name="t-side")
    assert fut.result(timeout=30) == 42
    seen["thread"].join(timeout=30)
    assert seen["allowed"] and seen["inline"] and not seen["thread"].is_alive()
    assert seen["thread"].name == "t-side"
    with pytest.raises(ValueError):
        compute_thread.side_thread(int, "x").result(timeout=30)


# The probe: load, then count the process's voluntary context switches over a 24-token greedy
# decode (`vcs`) after each thing a front end does; the last case is the control that proves the
# probe can see the throttling on this machine (a foreign thread keeps a torch OpenMP team).
PROBE = textwrap.dedent(
    """
    import json, os, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import torch
    from PIL import Image
    from minicpmv.runtime import MiniCPMV
    from minicpmv.runtime.batch import BatchChat, BatchRequest

    lm, mm = sys.argv[1:3]
    m = MiniCPMV.load(lm, mm, n_threads=2, vision_dtype="bf16")
    def img(seed):  # a new picture each time: the vision cache would answer a repeated one
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    text = [{"role": "user", "content": "Tell me a story."}]

    def switches():
        n = 0
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/status") as f:
                    n += int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        return n

    def vcs():
        m.reset()
        m.chat(text, max_new_tokens=2, greedy=True)  # the prompt is decoded outside the count
        n0 = switches()
        a = m.chat(text + [{"role": "assistant", "content": a0}, {"role": "user", "content": "More."}],
                   max_new_tokens=24, greedy=True)
        return (switches() - n0) / max(1, a.stats.decode_tokens)

    encoded_on = []  # the thread of each vision encode
    inner = m.vision._encode
    def recorded(*a, **kw):
        encoded_on.append(threading.current_thread().name)
        return inner(*a, **kw)
    m.vision._encode = recorded

    a0 = str(m.chat(text, max_new_tokens=8, greedy=True))
    out = {"fresh": vcs()}
    m.chat([{"role": "user", "content": [img(0), "What is this?"]}], max_new_tokens=4, greedy=True)
    out["after_image_main"] = vcs()
    callers = [ThreadPoolExecutor(1) for _ in range(2)]  # persistent, as a server's or Gradio's workers
    for i, c in enumerate(callers):
        msgs = [{"role": "user", "content": [img(1 + i), "And this?"]}]
        c.submit(m.chat, msgs, max_new_tokens=4, greedy=True).result()
    out["after_image_other_threads"] = callers[0].submit(vcs).result()
    bc = BatchChat(m, 2, 2048)
    reqs = [bc.submit(BatchRequest([{"role": "user", "content": [img(3), "Say it."]}], {"max_new_tokens": 3})),
            bc.submit(BatchRequest(text, {"max_new_tokens": 6}))]
    while bc.busy:
        bc.step()
    bc.close()
    assert all(r.error is None for r in reqs), [r.error for r in reqs]
    out["after_batch_image"] = vcs()
    out["encoded_on"] = encoded_on
    out["threads_left"] = sorted(t.name for t in threading.enumerate())
    foreign = ThreadPoolExecutor(1)  # a thread of the caller's that runs torch itself, and lives on
    foreign.submit(lambda: torch.ones(1 << 22).add_(1)).result()
    out["control_foreign_torch_thread"] = vcs()
    print(json.dumps(out))
    """
)


def test_decode_is_not_throttled_after_images_from_any_thread(files):
    lm, mm = files
    res = subprocess.run([sys.executable, "-c", PROBE, str(lm), str(mm)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    v = json.loads(res.stdout.strip().splitlines()[-1])
    fresh = v["fresh"]
    # images from the main thread and two other callers on the compute thread; BatchChat's on a
    # side thread of its own (the streams decode meanwhile), gone once it is done
    assert [n.split("_")[0] for n in v["encoded_on"]] == ["minicpmv-compute"] * 3 + ["batch-vision"], v
    assert not [n for n in v["threads_left"] if n.startswith("batch-vision")], v
    # control: a second OpenMP team makes every graph barrier a futex sleep, many per token
    assert v["control_foreign_torch_thread"] > 4 * fresh + 8, v
    for case in ("after_image_main", "after_image_other_threads", "after_batch_image"):
        assert v[case] < 2 * fresh + 4, (case, v)
