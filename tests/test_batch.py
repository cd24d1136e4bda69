"""Several conversations decoded together (issue 30, runtime/batch.py): continuous batching over
llama.cpp sequences. The oracle is `MiniCPMV.chat` on the same conversation alone, greedy: the model
uses a float32 KV cache without flash attention, so logits do not depend on how positions were
batched or which sequences shared a step, and greedy answers match token for token."""

from __future__ import annotations

import pytest

from minicpmv.runtime import ContextOverflowError, Video
from minicpmv.runtime.batch import BatchChat, BatchRequest

from .helpers import answers_alone, load_exact
from .test_runtime_chat import picture
from .video_fixtures import make_video

N = 16  # tokens per answer


@pytest.fixture(scope="module")
def model(files):
    m = load_exact(*files)
    yield m
    m.close()


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    clip = make_video(tmp_path_factory.mktemp("batch") / "clip.mp4", 12, 6, size=(64, 48)).read_bytes()
    return [
        [{"role": "user", "content": [picture(448, 448, seed=31), "What is in the picture?"]}],
        [{"role": "user", "content": "Count to ten."}],
        [{"role": "user", "content": [Video(clip, packing=2), "What happens in the video?"]}],
        [
            {"role": "user", "content": [picture(672, 448, seed=32), "Describe the colours."]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Why?"},
        ],
        [{"role": "user", "content": "Write a short poem about the sea."}],
    ]


@pytest.fixture(scope="module")
def alone(model, convs):
    return answers_alone(model, convs, N)


def test_concurrent_answers_equal_the_answers_alone(model, convs, alone):
    many = model.chat_many(convs[:4], greedy=True, max_new_tokens=N)
    assert [a.tokens for a in many] == alone[:4]
    assert all(a.stats.prompt_tokens > 0 and a.stats.decode_tokens == len(a.tokens) for a in many)


def test_small_chunks_and_fewer_slots_than_requests(model, convs, alone):
    """5 conversations on 2 slots, prompts fed 7 positions at a time (chunks end inside image slots):
    each waits for a free slot and still answers as alone."""
    batch = BatchChat(model, 2, 2048, chunk=7)
    try:
        reqs = batch.run([BatchRequest(c, {"greedy": True, "max_new_tokens": N}) for c in convs])
    finally:
        batch.close()
    assert [r.answer.tokens for r in reqs] == alone
    assert batch.steps > sum(r.stats.prompt_tokens for r in reqs) // 7  # the prompts really went in chunks


def test_a_request_joining_mid_generation_changes_no_running_answer(model, convs, alone):
    batch = BatchChat(model, 3, 2048, chunk=16)
    kw = {"greedy": True, "max_new_tokens": N}
    try:
        first = [batch.submit(BatchRequest(c, kw)) for c in convs[:2]]
        while not any(len(s.gen.tokens) >= 4 for s in batch.slots if s.gen is not None):
            batch.step()  # both are generating by now
        late = batch.submit(BatchRequest(convs[3], kw))
        while batch.busy:
            batch.step()
    finally:
        batch.close()
    assert [r.answer.tokens for r in first] == alone[:2] and late.answer.tokens == alone[3]


def test_cancelling_one_leaves_the_others(model, convs, alone):
    batch = BatchChat(model, 3, 2048)
    kw = {"greedy": True, "max_new_tokens": N}
    try:
        reqs = [batch.submit(BatchRequest(c, kw)) for c in convs[:3]]
        for _ in range(6):
            batch.step()
        reqs[1].cancel()
        while batch.busy:
            batch.step()
    finally:
        batch.close()
    assert reqs[1].answer is None and reqs[1].error is None and reqs[1].finished.is_set()
    assert reqs[0].answer.tokens == alone[0] and reqs[2].answer.tokens == alone[2]


def test_the_same_conversation_reuses_its_slot_and_decodes_only_new_tokens(model, convs):
    batch = BatchChat(model, 2, 2048)
    kw = {"greedy": True, "max_new_tokens": N}
    try:
        one = batch.run([BatchRequest(convs[0], kw)])[0]
        other = batch.run([BatchRequest(convs[1], kw)])[0]  # takes the other slot: the first stays cached
        follow = convs[0] + [{"role": "assistant", "content": str(one.answer)}, {"role": "user", "content": "More?"}]
        again = batch.run([BatchRequest(follow, kw)])[0]
    finally:
        batch.close()
    s1, s3 = one.stats, again.stats
    assert other.stats.prefill_start == 0
    # reused up to the first turn's generation prompt (the template renders a past answer without its
    # empty think block), and the image was not encoded again
    assert s3.prefill_start >= s1.prompt_tokens - 8 and s3.images_encoded == 0
    assert s3.tokens_prefilled == s3.prompt_tokens - s3.prefill_start < 64


def test_a_slot_never_exceeds_its_context(model, convs):
    """A long answer in a small slot ends with finish_reason "context" (an API's "length"), not an error."""
    batch = BatchChat(model, 2, 256)
    try:
        reqs = batch.run(
            [
                BatchRequest(convs[1], {"greedy": True, "max_new_tokens": 1000}),
                BatchRequest(convs[4], {"greedy": True, "max_new_tokens": 1000}),
            ]
        )
    finally:
        batch.close()
    for r in reqs:
        assert r.error is None and r.answer.stats.finish_reason in ("context", "stop")
        assert r.answer.stats.prompt_tokens + len(r.answer.tokens) <= batch.n_ctx_seq + 1
    too_long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ContextOverflowError, match="n_ctx=256"):
        model.chat_many([too_long], n_ctx_seq=256)


def test_a_lone_request_reads_its_prompt_in_bigger_steps(model, convs, alone):
    """Nobody to stall: ALONE_CHUNKS chunks go together."""
    import math

    from minicpmv.runtime.batch import ALONE_CHUNKS

    batch = BatchChat(model, 2, 2048, chunk=7)
    try:
        req = batch.run([BatchRequest(convs[0], {"greedy": True, "max_new_tokens": N})])[0]
    finally:
        batch.close()
    n = req.stats.prompt_tokens
    assert req.answer.tokens == alone[0]
    # chunks end at the plan's step boundaries too (text and slot runs), hence a few more steps
    assert math.ceil(n / (7 * ALONE_CHUNKS)) + N <= batch.steps < math.ceil(n / 7) + N


def test_a_short_question_jumps_ahead_of_a_long_prompt(model, convs):
    """Shortest remaining prompt first: a text question arriving while an image prompt is being read
    gets its first token before the image's."""
    batch = BatchChat(model, 2, 2048, chunk=8)
    kw = {"greedy": True, "max_new_tokens": 4}
    first_piece: dict[str, int] = {}

    def on_piece(name):
        return lambda p: first_piece.setdefault(name, batch.steps)

    try:
        image = batch.submit(BatchRequest(convs[0], kw, on_piece=on_piece("image")))
        while not any(s.state == "prefilling" and len(s.parts) < len(s.target) for s in batch.slots):
            batch.step()  # the image's prompt is being read, chunk by chunk
        batch.submit(BatchRequest(convs[1], kw, on_piece=on_piece("text")))
        while batch.busy:
            batch.step()
    finally:
        batch.close()
    assert image.answer is not None and first_piece["text"] < first_piece["image"]
