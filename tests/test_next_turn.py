"""The next turn's prefix decoded while idle (runtime/next_turn.py): it is exactly what the follow-up's
own prompt starts with, a follow-up then decodes only its new message, and its answer is the one a
cold cache gives (the oracle: the same conversation asked alone, float32 KV cache, greedy)."""

from __future__ import annotations

import pytest

from minicpmv.runtime import next_turn
from minicpmv.runtime.batch import BatchChat, BatchRequest

from .helpers import answers_alone, load_exact
from .test_runtime_chat import picture

N = 10


@pytest.fixture(scope="module")
def model(files):
    m = load_exact(*files)
    yield m
    m.close()


def conversation() -> list[dict]:
    return [{"role": "user", "content": [picture(448, 448, seed=5), "What is in the image?"]}]


def follow_up(msgs: list[dict], answer: str) -> list[dict]:
    return [*msgs, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]


@pytest.mark.parametrize("think", [False, True], ids=["no-thinking", "thinking"])
def test_the_prefix_is_what_the_follow_up_starts_with_and_the_follow_up_decodes_only_its_question(model, think):
    msgs = conversation()
    model.reset()
    first = model.chat(msgs, greedy=True, max_new_tokens=N, enable_thinking=think)
    # (with thinking the tiny model is still reasoning after N tokens: the answer is empty)
    prefix = next_turn.history_prefix(model, msgs, str(first), {"enable_thinking": think})
    nxt = follow_up(msgs, str(first))
    full, _ = model.prompt_runs(model.build_prompt(nxt, enable_thinking=think))
    assert full.common_prefix(prefix, len(prefix)) == len(prefix) < len(full)
    # the prefix ends where the new question's text starts: after "<|im_start|>user\n"
    opening = model.lm.tokenize("<|im_start|>user\n")
    assert prefix.runs[-1].tokens[-len(opening) :] == opening
    question = model.lm.tokenize("And the colours?")
    assert full.prefix(len(prefix) + len(question)).runs[-1].tokens[-len(question) :] == question
    # the cache after the answer differs from the prefix right after the first turn's "assistant\n"
    held = model._kv.common_prefix(prefix, len(prefix))
    assert held < len(prefix)

    done = next_turn.warm(model, msgs, str(first), {"enable_thinking": think}, stop=lambda: False)
    assert done == len(prefix) - held
    got = model.chat(nxt, greedy=True, max_new_tokens=N, enable_thinking=think)
    assert got.stats.prefill_start == len(prefix)
    assert got.stats.tokens_prefilled == len(full) - len(prefix)
    assert got.stats.vision_ms == []
    model.reset()
    assert got.tokens == model.chat(nxt, greedy=True, max_new_tokens=N, enable_thinking=think).tokens


def test_warming_stops_when_asked_and_leaves_a_usable_cache(model):
    msgs = conversation()
    model.reset()
    first = str(model.chat(msgs, greedy=True, max_new_tokens=N))
    calls = []
    done = next_turn.warm(model, msgs, first, {}, stop=lambda: calls.append(1) or len(calls) > 1)
    assert 0 < done <= next_turn.WARM_CHUNK
    nxt = follow_up(msgs, first)
    got = model.chat(nxt, greedy=True, max_new_tokens=N)
    assert got.tokens == answers_alone(model, [nxt], N)[0]


def test_a_batch_slot_warms_its_follow_up_while_idle(model):
    msgs = conversation()
    with model._turn.call():
        batch = BatchChat(model, 2, 2048, follow_ups=True)
        try:
            (req,) = batch.run([BatchRequest(msgs, {"greedy": True, "max_new_tokens": N})])
            answer = str(req.answer)
            prefix = next_turn.history_prefix(model, msgs, answer, {})
            steps = batch.steps
            while batch.step():  # idle: each step decodes a chunk of the prefix
                pass
            assert batch.steps > steps and batch.warmed > 0
            assert any(s.kv.common_prefix(prefix, len(prefix)) == len(prefix) for s in batch.slots)
            nxt = follow_up(msgs, answer)
            (req2,) = batch.run([BatchRequest(nxt, {"greedy": True, "max_new_tokens": N})])
            assert req2.stats.prefill_start == len(prefix)
        finally:
            batch.close()
    assert req2.answer.tokens == answers_alone(model, [nxt], N)[0]


def test_without_follow_ups_an_idle_batch_does_nothing(model):
    with model._turn.call():
        batch = BatchChat(model, 1, 2048)
        try:
            batch.run([BatchRequest(conversation(), {"greedy": True, "max_new_tokens": N})])
            steps = batch.steps
            assert batch.step() is False and batch.steps == steps
        finally:
            batch.close()
