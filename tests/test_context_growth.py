"""A context sized per turn and grown with the conversation (runtime/context_size.py).

- the sizing rule with injected numbers (rounding, at least 1.5x, the trained-context cap, O(log n) grows);
- the KV cache size we report equals llama.cpp's own (its log line), and the 8B model's 576 MiB at 4096;
- a conversation that outgrows its first context keeps answering: the prefix is copied into the larger
  context (counters: only the new part is decoded, no image encoded or decoded again), and its greedy
  answers and logits equal those of a model given a large enough context from the start (f32 KV cache,
  no flash attention, so the two are computed alike to float32 rounding); the same when llama.cpp
  refuses the copy (everything is decoded again);
- the model's trained context (a checkpoint converted with context_length 1024): a longer prompt is a
  one-line error, generation that reaches it ends with finish_reason "context";
- `minicpm-run --verbose` prints the context size and KV cache MiB.
"""

from __future__ import annotations

import json
import re

import pytest

from minicpmv.runtime import ContextOverflowError, MiniCPMV
from minicpmv.runtime.context_size import GRANULE, context_size, kv_cache_bytes
from minicpmv.runtime.llama import KVShape
from minicpmv.runtime.llama_backend import recent_log
from minicpmv.runtime.llama_context import LlamaContext

from .test_runtime_chat import picture, rel_err, run_cli

TRAINED = 1024  # context_length of the short-context checkpoint below


# --------------------------------------------------------------------------- the sizing rule


def test_context_size_rounds_grows_by_half_and_stops_at_the_trained_context():
    limit = 40960
    assert context_size(110 + 100, limit) == 512  # first turn: prompt + max new tokens, rounded up
    assert context_size(513, limit) == 1024
    assert context_size(1, limit) == GRANULE
    assert context_size(500, limit, current=512) == 512  # fits: unchanged
    assert context_size(1100, limit, current=1024) == 1536  # grows by at least 1.5x ...
    assert context_size(5000, limit, current=1024) == 5120  # ... or to what the turn needs
    assert context_size(60000, limit) == limit  # never beyond the trained context
    assert context_size(60000, limit, current=36864) == limit
    assert context_size(60000, limit, current=limit) == limit
    assert context_size(3000, 2100) == 2100  # a limit that is not a multiple of the granule
    assert context_size(700, limit, granule=256) == 768
    # a conversation growing 100 positions a turn up to the limit: O(log n) copies, not one per turn
    current, grows = 0, 0
    for needed in range(300, limit + 1, 100):
        new = context_size(needed, limit, current)
        grows += new != current and current > 0
        assert new >= min(needed, limit) and new % GRANULE == 0
        current = new
    assert current == limit and grows <= 11  # 512 * 1.5^11 > 40960


def test_kv_cache_bytes_of_the_8b_model():
    """MiniCPM-V 4.5's Qwen3-8B: 36 layers x 8 KV heads x 128: 576 MiB of f16 cache at 4096
    positions (144 KiB a position), twice that in f32."""
    shape = KVShape(n_layer=36, n_head_kv=8, head_dim_k=128, head_dim_v=128)
    assert kv_cache_bytes(4096, shape, "f16") == 576 * 2**20
    assert kv_cache_bytes(4096, shape, "f32") == 2 * 576 * 2**20
    assert kv_cache_bytes(32, shape, "q8_0") == 32 * 36 * 2 * 1024 // 32 * 34


# --------------------------------------------------------------------------- growth


def load32(files, n_ctx=None) -> MiniCPMV:
    """f32 KV cache, no flash attention: logits do not depend on batching (MiniCPMV.load's docstring)."""
    return MiniCPMV.load(*files, n_ctx=n_ctx, n_threads=2, vision_dtype="f32", kv_type="f32", flash_attn=False)


QUESTIONS = [
    "Tell me more about the colours and the shapes. " * 25,
    "And the background? " * 60,
    "What else is there in the picture, from left to right? " * 30,
    "Why? " * 150,
]


def converse(model: MiniCPMV, image) -> list:
    """Five greedy turns about one image, each question a few hundred tokens long."""
    msgs = [{"role": "user", "content": [image, "What is in the image?"]}]
    answers = []
    for q in [None, *QUESTIONS]:
        if q is not None:
            msgs += [{"role": "assistant", "content": str(answers[-1])}, {"role": "user", "content": q}]
        answers.append(model.chat(msgs, greedy=True, max_new_tokens=48))
    return answers


@pytest.fixture(scope="module")
def reference(files):
    """The conversation on a model whose fixed context holds all of it."""
    big = load32(files, n_ctx=8192)
    answers = converse(big, picture(448, 448, seed=3))
    big.close()
    return answers


def test_a_conversation_outgrowing_its_context_keeps_answering_with_its_prefix(files, reference):
    m = load32(files)
    assert m.ctx is None  # nothing allocated at load
    changes = []
    m.watch_context(changes.append)
    answers = converse(m, picture(448, 448, seed=3))
    grown = 0
    for a, ref in zip(answers, reference):
        s, r = a.stats, ref.stats
        assert a.tokens == ref.tokens  # the same greedy answer as with the large context
        # the same reuse as in the large context: only the new part of the prompt is decoded
        assert (s.prompt_tokens, s.prefill_start, s.tokens_prefilled) == (
            r.prompt_tokens,
            r.prefill_start,
            r.tokens_prefilled,
        )
        assert s.n_ctx >= s.prompt_tokens + 48 and s.n_ctx % GRANULE == 0
        if s.ctx_grows:
            grown += 1
            assert s.tokens_kept == s.prefill_start > 0 and s.tokens_prefilled == s.prompt_tokens - s.tokens_kept
    assert answers[0].stats.n_ctx == 512 and answers[0].stats.ctx_grows == 0
    assert grown >= 2 and answers[-1].stats.n_ctx < 8192
    assert sum(a.stats.images_encoded + a.stats.slots_prefilled for a in answers[1:]) == 0  # the slot was kept
    assert sum(a.stats.decode_tokens for a in answers) > 48  # the answers said something
    assert [c.n_ctx for c in changes] == sorted({a.stats.n_ctx for a in answers})
    assert all(
        c.previous == 0 if i == 0 else c.previous == changes[i - 1].n_ctx and c.kept > 0 for i, c in enumerate(changes)
    )
    # and the cache the copies built is the one a large context builds: next-token logits agree
    msgs = [{"role": "user", "content": [picture(448, 448, seed=3), "What is in the image?"]}]
    for a in answers[:-1]:
        msgs += [{"role": "assistant", "content": str(a)}, {"role": "user", "content": "Go on."}]
    ours = m.prefill(msgs)
    big = load32(files, n_ctx=8192)
    theirs = big.prefill(msgs)
    big.close()
    print(f"logits after {grown} grows vs a large context: max |diff| / range = {rel_err(ours, theirs):.1e}")
    assert rel_err(ours, theirs) < 1e-6
    m.close()


def test_a_refused_copy_decodes_the_prompt_again(files, reference, monkeypatch):
    monkeypatch.setattr(LlamaContext, "seq_state", lambda self: None)  # as if llama.cpp could not write it
    m = load32(files)
    answers = converse(m, picture(448, 448, seed=3))
    grows = [a.stats for a in answers if a.stats.ctx_grows]
    assert grows and all(
        s.prefill_start == 0 and s.tokens_kept == 0 and s.tokens_prefilled == s.prompt_tokens for s in grows
    )
    assert [a.tokens for a in answers] == [r.tokens for r in reference]
    m.close()


def test_the_context_never_grows_under_an_open_stream(files):
    """A call that needs a larger context waits for the open stream (it holds the model's turn), so a
    stream never reads from a context that was replaced under it."""
    import threading

    m = load32(files)
    hello = [{"role": "user", "content": "Hello"}]
    alone = m.chat(hello, greedy=True, max_new_tokens=8).tokens
    m.reset()
    stream = m.chat(hello, stream=True, greedy=True, max_new_tokens=8)
    next(stream)
    grown = []
    other = threading.Thread(
        target=lambda: grown.append(
            m.chat([{"role": "user", "content": "Hello " * 700}], greedy=True, max_new_tokens=2).stats
        )
    )
    other.start()
    other.join(0.5)
    assert other.is_alive() and m.stats.ctx_grows == 0  # waiting for the stream
    list(stream)
    other.join(300)
    assert stream.result.tokens == alone and grown[0].ctx_grows == 1
    m.close()


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_reported_kv_size_is_llamacpps(files, kv_type):
    m = MiniCPMV.load(*files, n_threads=2, vision_dtype="f32", kv_type=kv_type)
    changes = []
    m.watch_context(changes.append)
    m.chat([{"role": "user", "content": "Hello " * 200}], greedy=True, max_new_tokens=2)
    said = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", recent_log(200))
    assert said and len(changes) == 1
    mib, cells = said[-1]
    n = changes[0].n_ctx
    assert int(cells) == n == m.stats.n_ctx == context_size(m.stats.prompt_tokens + 2, m.lm.n_ctx_train) > 512
    assert f"{changes[0].kv_bytes / 2**20:.2f}" == mib
    assert str(changes[0]) == f"context: {n} tokens, KV cache {float(mib):.1f} MiB (sized for the turn)"
    m.close()


# --------------------------------------------------------------------------- the trained context


@pytest.fixture(scope="module")
def short_trained(tmp_path_factory, tiny_real_vocab_ckpt, tiny_real_vocab_gguf):
    """The real-vocabulary tiny checkpoint (it seldom samples an end token) converted with a trained
    context of TRAINED positions (config.json's max_position_embeddings -> qwen3.context_length)."""
    from minicpmv.convert.pipeline import convert

    ck = tmp_path_factory.mktemp("ckpt-short") / "tiny"
    ck.mkdir()
    for f in tiny_real_vocab_ckpt.iterdir():
        if f.name != "config.json":
            (ck / f.name).symlink_to(f)
    cfg = json.loads((tiny_real_vocab_ckpt / "config.json").read_text())
    cfg["max_position_embeddings"] = TRAINED
    (ck / "config.json").write_text(json.dumps(cfg))
    lm = convert(
        ck, tmp_path_factory.mktemp("lm-short"), progress=False, quant_type="Q8_0", write_lm=True, write_mmproj=False
    ).lm_path
    m = MiniCPMV.load(lm, tiny_real_vocab_gguf[1], n_threads=2, vision_dtype="f32")
    assert m.lm.n_ctx_train == TRAINED
    yield m
    m.close()


def test_a_prompt_beyond_the_trained_context_is_one_line(short_trained):
    m = short_trained
    with pytest.raises(ContextOverflowError) as e:
        m.chat([{"role": "user", "content": "word " * 1500}], max_new_tokens=4)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"needs \d{4} tokens", msg) and f"trained context holds {TRAINED}" in msg
    assert m.ctx is None  # refused before any context was made


def test_generation_reaching_the_trained_context_ends_with_context(short_trained):
    m = short_trained
    msgs = [{"role": "user", "content": "Tell me a long story."}]
    a = m.chat(msgs, greedy=True, max_new_tokens=5000)
    s = a.stats
    assert s.n_ctx == TRAINED and s.finish_reason == "context"
    assert s.decode_tokens == TRAINED - s.prompt_tokens + 1  # every position used, the last token sampled
    # the next turn no longer fits: the error, and the model still answers a new conversation
    msgs += [{"role": "assistant", "content": str(a)}, {"role": "user", "content": "And then?"}]
    with pytest.raises(ContextOverflowError, match="trained context"):
        m.chat(msgs, max_new_tokens=4)
    b = m.chat([{"role": "user", "content": "Hello"}], greedy=True, max_new_tokens=4)
    assert b.stats.decode_tokens > 0 and b.stats.n_ctx == TRAINED  # the context never shrinks


# --------------------------------------------------------------------------- CLI


def test_cli_verbose_prints_the_kv_cache_size(files):
    res = run_cli(
        [
            "--model",
            files[0],
            "--mmproj",
            files[1],
            "Hello",
            "--max-tokens",
            "4",
            "--greedy",
            "--vision-dtype",
            "f32",
            "--threads",
            "2",
            "--verbose",
        ]
    )
    assert res.exit_code == 0, res.stderr
    # the tiny model: 2 layers x 2 KV heads x 64, f16 K and V: 1 KiB a position
    assert "context: 512 tokens, KV cache 0.5 MiB (sized for the turn)" in res.stderr
    res = run_cli(
        [
            "--model",
            files[0],
            "--mmproj",
            files[1],
            "Hello",
            "--max-tokens",
            "4",
            "--greedy",
            "--vision-dtype",
            "f32",
            "--threads",
            "2",
            "--verbose",
            "--ctx",
            "3000",
        ]
    )
    assert res.exit_code == 0, res.stderr
    assert "context: 3072 tokens, KV cache 3.0 MiB (fixed by --ctx / n_ctx)" in res.stderr
