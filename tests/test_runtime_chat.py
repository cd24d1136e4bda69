"""MiniCPMV runtime on the tiny checkpoint (F32 language model + f32 mmproj).

- pipeline parity: first-token logits vs llama.cpp's own mtmd pipeline (mtmd_tokenize +
  mtmd_helper_eval_chunks) for the same prompt and a 448x448 image;
- multi-turn: the second turn reuses the KV cache from the first differing token, re-encodes and
  re-prefills no image, and matches a fresh session (logits and greedy answer), thinking on and off;
- the legacy (OpenBMB / llama.cpp script) mmproj layout gives the same embeddings and logits;
- streaming, video groups, context overflow, and the CLI's one-line errors for bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minicpmv.runtime import ContextOverflowError, MiniCPMV, ModelFileError
from minicpmv.runtime.llama import LlamaModel
from minicpmv.runtime.llama_context import ContextParams, LlamaContext
from minicpmv.runtime.prompt import IMAGE_TAG
from minicpmv.runtime.token_embeddings import TokenEmbeddings

from .helpers import load_exact, one_error_line, run_in_process
from .mtmd import TEXT, Mtmd, marker

# docs/pitfalls.md §6: llama.cpp's embedding path reproduces the reference to ~2e-3 of the logit range; mtmd
# and our vision encoder differ only in float32 rounding for a 448x448 image (no resize, no slicing,
# and side 32 has no NaViT bucket difference), so the same bound is generous.
REL_TOL = 2e-3


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some noise (content matters only through the encoder)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def load(files, **kw) -> MiniCPMV:
    lm, mm = files
    kw = {"n_ctx": 2048, "n_threads": 2, "vision_dtype": "f32"} | kw
    return MiniCPMV.load(lm, mm, **kw)


@pytest.fixture(scope="module")
def model(files):
    m = load(files)
    yield m
    m.close()


@pytest.fixture(scope="module")
def pair32(files):
    """Two sessions with a float32 KV cache and no flash attention: logits then do not depend on how
    positions were batched. (llama.cpp's defaults, f16 cache + flash attention whose CPU kernel
    works in f16, move them by up to ~1e-3 of the range; checked separately below.)"""
    a, b = load(files, kv_type="f32", flash_attn=False), load(files, kv_type="f32", flash_attn=False)
    yield a, b
    a.close()
    b.close()


# --------------------------------------------------------------------------- mtmd oracle


def mtmd_first_logits(lm_path, mm_path, prompt: str, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's pipeline: mtmd_tokenize (prompt with the media marker) + mtmd_helper_eval_chunks;
    returns the last position's logits and the token ids (image chunks as 64 x -1)."""
    lm = LlamaModel(lm_path, read_file=False)
    ctx = LlamaContext(lm, ContextParams(n_ctx=1024, n_batch=512, n_threads=2))
    try:
        with Mtmd(mm_path, lm, n_threads=2, flash_attn=False) as mt, mt.tokenize([image], prompt) as chunks:
            ids: list[int] = []
            for c in chunks:
                ids += c.tokens if c.kind == TEXT else [-1] * c.n_tokens
            assert chunks.eval(ctx) == len(ids)
            logits = ctx.logits().copy()
    finally:
        ctx.close()
        lm.close()
    return logits, ids


@pytest.mark.parametrize("fuse,size", [(True, (448, 448)), (False, (448, 448)), (True, (896, 448))])
def test_first_token_logits_match_mtmd_pipeline(model, files, fuse, size):
    """fuse=False decodes as mtmd does (text runs as tokens, each slot its own 64-row batch);
    fuse=True (default) sends the placeholder's tokens as embedding rows with the slot. 896x448 is
    sliced (overview 630x322 + two 448x448 slices) identically by mtmd and the reference: its
    refined image keeps the aspect, so mtmd's letter-boxing is a no-op (docs/pitfalls.md §2)."""
    img = picture(*size, seed=1)
    msgs = [{"role": "user", "content": [img, "What is in the image?"]}]
    model.fuse_placeholders = fuse
    model.reset()
    ours = model.prefill(msgs, use_image_id=False)
    prompt = model.build_prompt(msgs, use_image_id=False)
    assert model.stats.slots_prefilled == (1 if size == (448, 448) else 3) and model.stats.prefill_start == 0
    theirs, their_ids = mtmd_first_logits(*files, prompt.text.replace(IMAGE_TAG, marker()), np.asarray(img))
    # same token sequence (mtmd writes <image>/</image> around its 64 embeddings itself)
    assert model.prompt_token_ids(prompt, slot_id=-1) == their_ids
    err = rel_err(ours, theirs)
    print(f"first-token logits vs mtmd ({size[0]}x{size[1]}, fuse={fuse}): max |diff| / range = {err:.2e}")
    assert err < REL_TOL
    assert int(ours.argmax()) == int(theirs.argmax())
    # and the image matters: without it (text only) the logits are far from mtmd's
    model.reset()
    text_only = model.prefill([{"role": "user", "content": ["What is in the image?"]}], use_image_id=False)
    assert rel_err(text_only, theirs) > 10 * REL_TOL
    model.fuse_placeholders = True


@pytest.mark.parametrize("lm_type", ["Q4_K_M", "Q8_0"])
def test_fused_placeholder_rows_equal_llamacpp_token_embeddings(tiny_lm_gguf, tiny_mmproj_gguf, lm_type):
    """Placeholder tokens sent as gguf-py-dequantized token_embd rows give the logits llama.cpp
    gives for the same token ids (f32 KV, no flash attention: batching leaves no noise)."""
    m = load_exact(tiny_lm_gguf(lm_type), tiny_mmproj_gguf("f32"), n_ctx=2048, n_threads=2)
    try:
        msgs = [{"role": "user", "content": [picture(896, 448, seed=12), "Which side is brighter?"]}]
        m.fuse_placeholders = False
        tokens = m.prefill(msgs)
        assert m.stats.slots_prefilled == 3
        assert m.stats.prefill_batches == 3 + 4  # 3 slots; text before, between (2), after
        m.reset()
        m.fuse_placeholders = True
        fused = m.prefill(msgs)
        assert m.tok_embd.available and m.stats.slots_prefilled == 3
        # the text before and after the image (its question) joins it: one embedding batch
        assert m.stats.prefill_batches == 1
        err = rel_err(fused, tokens)
        print(f"fused vs token batches ({lm_type}): {err:.2e}")
        assert err < 1e-5
    finally:
        m.close()


def test_a_long_question_after_the_image_joins_its_embedding_batch(tiny_lm_gguf, tiny_mmproj_gguf, monkeypatch):
    """Any text run touching a slot goes with it, however long (one decode call, not two), with the
    logits of token batches; the token_embd row cache stays bounded (emptied when full) and gives
    the same rows as an uncached read."""
    monkeypatch.setattr(TokenEmbeddings, "MAX_CACHED", 8)
    m = load_exact(tiny_lm_gguf("Q8_0"), tiny_mmproj_gguf("f32"), n_ctx=2048, n_threads=2)
    try:
        question = "Describe every part of the picture, the colours, the light and the shapes. " * 8
        msgs = [{"role": "user", "content": [picture(448, 448, seed=5), question]}]
        m.fuse_placeholders = False
        tokens = m.prefill(msgs)
        assert m.stats.prefill_batches == 1 + 2  # the slot; text before and after it
        m.reset()
        m.fuse_placeholders = True
        fused = m.prefill(msgs)
        assert m.stats.prefill_batches == 1
        assert m.stats.tokens_prefilled > 100 + 64
        assert rel_err(fused, tokens) < 1e-5

        te = m.tok_embd
        ids = list(range(40))
        one_by_one = np.stack([te.rows([i])[0] for i in ids])
        assert len(te._rows) <= 8
        uncached = TokenEmbeddings(te.file, te.n_embd).rows(ids)
        np.testing.assert_array_equal(one_by_one, uncached)
        np.testing.assert_array_equal(te.rows(ids[::-1]), uncached[::-1])  # more than fit: all returned
    finally:
        m.close()


# --------------------------------------------------------------------------- multi-turn


def cached_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("think", [False, True])
def test_second_turn_reuses_cache_and_matches_fresh_session(pair32, think):
    model, fresh = pair32
    img = picture(640, 480, seed=2)  # 2x1 grid: 3 slots
    msgs1 = [{"role": "user", "content": [img, "Describe the picture."]}]
    kw = dict(enable_thinking=think, greedy=True, max_new_tokens=6)
    model.reset()
    a1 = model.chat(msgs1, **kw)
    assert a1.stats.images_encoded in (0, 1) and a1.stats.slots_prefilled == 3
    in_cache = model.prompt_token_ids(model.build_prompt(msgs1, enable_thinking=think)) + a1.tokens

    msgs2 = msgs1 + [{"role": "assistant", "content": [a1.raw]}, {"role": "user", "content": "Tell me more."}]
    ids2 = model.prompt_token_ids(model.build_prompt(msgs2, enable_thinking=think))
    a2 = model.chat(msgs2, **kw)
    s = a2.stats
    assert s.images_encoded == 0 and s.slots_encoded == 0 and s.slots_prefilled == 0
    assert s.prefill_start == cached_prefix(in_cache, ids2)
    assert s.prefill_start > 64 * 3 and s.tokens_prefilled == len(ids2) - s.prefill_start
    assert s.prompt_tokens == len(ids2)

    fresh.reset()
    f2 = fresh.chat(msgs2, **kw)
    assert f2.stats.prefill_start == 0 and f2.stats.slots_prefilled == 3
    assert a2.tokens == f2.tokens and str(a2) == str(f2) and a2.thinking == f2.thinking

    # first-token logits of the second turn: cached session vs fresh session
    model.reset()
    model.chat(msgs1, **kw)
    cached = model.prefill(msgs2, enable_thinking=think)
    assert model.stats.prefill_start == s.prefill_start and model.stats.images_encoded == 0
    fresh.reset()
    new = fresh.prefill(msgs2, enable_thinking=think)
    err = rel_err(cached, new)
    print(f"turn-2 logits cached vs fresh (think={think}, f32 KV): {err:.2e}")
    assert err < 1e-5


def test_second_turn_logits_with_default_precision(model, files):
    """llama.cpp defaults (f16 KV, flash attention): cached vs fresh within the f16 noise."""
    img = picture(640, 480, seed=2)
    msgs1 = [{"role": "user", "content": [img, "Describe the picture."]}]
    model.reset()
    a1 = model.chat(msgs1, greedy=True, max_new_tokens=6)
    msgs2 = msgs1 + [{"role": "assistant", "content": [a1.raw]}, {"role": "user", "content": "More."}]
    cached = model.prefill(msgs2)
    assert model.stats.prefill_start > 0 and model.stats.slots_prefilled == 0
    model.reset()
    new = model.prefill(msgs2)
    err = rel_err(cached, new)
    print(f"turn-2 logits cached vs fresh (f16 KV + flash attention): {err:.2e}")
    assert err < REL_TOL and int(cached.argmax()) == int(new.argmax())


def test_images_are_not_reencoded_and_changes_are_seen(model):
    a, b = picture(448, 448, seed=3), picture(448, 448, seed=4)
    model.reset()
    model.prefill([{"role": "user", "content": [a, "?"]}])
    n_first = model.stats.images_encoded
    model.reset()
    model.prefill([{"role": "user", "content": [a, "?"]}])
    assert model.stats.images_encoded == 0 and model.stats.slots_prefilled == 1  # cached embeddings
    # a different image at the same place: re-encoded, and the cache stops before its slot
    model.prefill([{"role": "user", "content": [b, "?"]}])
    assert model.stats.images_encoded == 1 and model.stats.slots_prefilled == 1
    assert model.stats.prefill_start < 20
    assert n_first in (0, 1)


def test_stream_matches_non_stream(model):
    img = picture(448, 448, seed=5)
    msgs = [{"role": "user", "content": [img, "Hi"]}]
    for think in (False, True):
        whole = model.chat(msgs, enable_thinking=think, greedy=True, max_new_tokens=12)
        s = model.chat(msgs, enable_thinking=think, greedy=True, max_new_tokens=12, stream=True)
        pieces = list(s)
        assert s.result.tokens == whole.tokens and model.last is s.result
        answer = "".join(p for p in pieces if not p.thinking)
        assert answer.strip() == str(whole)
        # all pieces together are the reference's stream: "<think>\n" (thinking) + generated text
        assert "".join(pieces) == ("<think>\n" if think else "") + model.lm.detokenize(whole.tokens)
        hidden = model.chat(
            msgs, enable_thinking=think, greedy=True, max_new_tokens=12, stream=True, show_thinking=False
        )
        assert all(not p.thinking for p in hidden)
        if think:
            assert pieces[0] == "<think>\n" and pieces[0].thinking
            assert whole.raw.startswith("<think>\n")


def test_a_stream_left_early_frees_the_model_when_closed_or_dropped(model):
    """Single-threaded code that stops reading a stream: close() it (or let it go, or use `with`),
    then ask again."""
    msgs = [{"role": "user", "content": "Count to ten."}]
    other = [{"role": "user", "content": "Something else."}]
    s = model.chat(msgs, greedy=True, max_new_tokens=50, stream=True)
    next(s)
    s.close()
    assert not model.busy and list(s) == []
    assert model.chat(other, greedy=True, max_new_tokens=2).stats.decode_tokens >= 1
    with model.chat(msgs, greedy=True, max_new_tokens=50, stream=True) as s:
        next(s)
    assert not model.busy
    for _ in model.chat(msgs, greedy=True, max_new_tokens=50, stream=True):
        break  # the loop's iterator is dropped here
    assert not model.busy


def test_greedy_with_repetition_penalty_follows_transformers_rule(model):
    """Each pick = argmax of the logits with every generated id penalised as transformers'
    RepetitionPenaltyLogitsProcessor does (negative * p, positive / p)."""
    msgs = [{"role": "user", "content": "Say something."}]
    pen = 0.2  # < 1 rewards repeats: a random model never repeats within 40 tokens otherwise
    a = model.chat(msgs, greedy=True, repetition_penalty=pen, max_new_tokens=40)
    plain = model.chat(msgs, greedy=True, repetition_penalty=1.0, max_new_tokens=40)
    logits = model.prefill(msgs)
    seen: list[int] = []
    pos = model.stats.prompt_tokens
    for tok in a.tokens:
        lg = logits.copy()
        ids = np.array(sorted(set(seen)), dtype=np.int64)
        if len(ids):
            v = lg[ids]
            lg[ids] = np.where(v < 0, v * pen, v / pen)
        assert int(lg.argmax()) == tok
        seen.append(tok)
        model.ctx.decode_tokens([tok], pos)
        pos += 1
        logits = model.ctx.logits().copy()
    # the penalty mattered here: it made greedy repeat itself where plain greedy does not
    assert len(set(a.tokens)) < len(a.tokens) and a.tokens != plain.tokens
    model.reset()


def test_reference_sampling_defaults(model, monkeypatch):
    """Without thinking the reference sets T 0.7, top_p 0.8, top_k 100, penalty 1.03; with thinking
    only T 0.7, so transformers' defaults (top_p 1.0, top_k 50, penalty 1.0) apply; callers override."""
    import minicpmv.runtime.generate as generate_mod

    seen = []
    real = generate_mod.Sampler

    def spy(n_vocab, params):
        seen.append(params)
        return real(n_vocab, params)

    monkeypatch.setattr(generate_mod, "Sampler", spy)
    msgs = [{"role": "user", "content": "Hi"}]
    model.chat(msgs, max_new_tokens=1)
    model.chat(msgs, max_new_tokens=1, enable_thinking=True)
    model.chat(msgs, max_new_tokens=1, enable_thinking=True, top_k=7, repetition_penalty=1.2)
    got = [(p.temperature, p.top_p, p.top_k, p.repetition_penalty) for p in seen]
    assert got == [(0.7, 0.8, 100, 1.03), (0.7, 1.0, 50, 1.0), (0.7, 1.0, 7, 1.2)]


def test_sampling_is_seeded(model):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = model.chat(msgs, seed=7, max_new_tokens=10, temperature=1.5)
    b = model.chat(msgs, seed=7, max_new_tokens=10, temperature=1.5)
    c = model.chat(msgs, seed=8, max_new_tokens=10, temperature=1.5)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_video_groups_one_slot_per_group(model):
    frames = [picture(448, 448, seed=10 + i) for i in range(5)]
    groups = [[0, 1, 2], [3, 4]]
    msgs = [{"role": "user", "content": frames + ["What happens?"]}]
    model.reset()
    logits = model.prefill(msgs, use_image_id=False, max_slice_nums=1, temporal_ids=groups)
    st = model.stats
    assert st.images_encoded == 2 and st.slots_encoded == 2 and st.slots_prefilled == 2
    assert np.isfinite(logits).all()
    # the group's slot is the resampler over all its frames (not the first frame alone)
    from minicpmv.runtime.image import slice_image

    pix = [slice_image(f, 1).pixel_values()[0] for f in frames]
    joint = model.vision.encode_slices(pix[:3], [[0, 1, 2]])[0]
    single = model.vision.encode_slices(pix[:1], None)[0]
    key = next(k for k, e in model.vision_cache.items() if e.shape[0] == 1 and np.allclose(e[0], joint, atol=1e-5))
    assert key is not None and not np.allclose(joint, single, atol=1e-3)


def test_context_overflow_is_a_clear_error(files):
    small = load(files, n_ctx=256)
    with pytest.raises(ContextOverflowError, match=r"needs \d+ tokens .*n_ctx=256"):
        small.chat([{"role": "user", "content": [picture(1344, 1344), "?"]}], max_new_tokens=4)
    small.close()


# --------------------------------------------------------------------------- legacy mmproj layout


def write_legacy_mmproj(src, dst):
    """Our mmproj rewritten as llama.cpp's legacy MiniCPM-V script writes it: the vision MLP's fc1
    stored as ffn_down and fc2 as ffn_up, and no general.type key."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "clip")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.type"):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        name = t.name
        if ".ffn_up." in name:
            name = name.replace(".ffn_up.", ".ffn_down.")
        elif ".ffn_down." in name:
            name = name.replace(".ffn_down.", ".ffn_up.")
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        w.add_tensor(name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_legacy_mmproj_layout_same_embeddings_and_logits(model, files, tmp_path):
    lm, mm = files
    legacy = write_legacy_mmproj(mm, tmp_path / "mmproj-model-f16.gguf")
    old = load((lm, legacy))
    try:
        assert old.vision.legacy_ffn and not model.vision.legacy_ffn
        img = picture(448, 448, seed=6)
        from minicpmv.runtime.image import slice_image

        pix = slice_image(img).pixel_values()
        np.testing.assert_allclose(old.vision.encode_slices(pix), model.vision.encode_slices(pix), rtol=0, atol=1e-6)
        msgs = [{"role": "user", "content": [img, "What is it?"]}]
        model.reset()
        ours = model.prefill(msgs)
        theirs = old.prefill(msgs)
        assert rel_err(theirs, ours) < 1e-6
    finally:
        old.close()


# --------------------------------------------------------------------------- CLI and bad input


def run_cli(args):
    return run_in_process("minicpm-run", *args)


def run_error(res) -> str:
    return one_error_line(res, prog="minicpm-run", code=None)


def test_cli_answers_with_json(files, tmp_path):
    import json

    lm, mm = files
    pic = tmp_path / "pic.png"
    picture(448, 448, seed=9).save(pic)
    res = run_cli(
        [
            "--model",
            lm,
            "--mmproj",
            mm,
            pic,
            "What is it?",
            "--json",
            "--greedy",
            "--max-tokens",
            "5",
            "--threads",
            "2",
            "--vision-dtype",
            "f32",
        ]
    )
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"answer", "thinking", "timings"}
    t = out["timings"]
    assert t["slots_encoded"] == 1 and len(t["vision_ms"]) == 1 and t["decode_tokens"] <= 5


def test_cli_missing_model_files(tmp_path):
    line = run_error(run_cli(["--model", tmp_path / "nope.gguf", "--mmproj", tmp_path / "mm.gguf", "hi"]))
    assert "nope.gguf" in line and "not found" in line
    line = run_error(run_cli(["--model-dir", tmp_path / "missing", "hi"]))
    assert "missing" in line
    (tmp_path / "empty").mkdir()
    line = run_error(run_cli(["--model-dir", tmp_path / "empty", "hi"]))
    assert "no language-model" in line


def test_cli_mmproj_of_another_width(files, tmp_path):
    from minicpmv.convert.pipeline import convert
    from minicpmv.convert.synthetic import make_checkpoint

    ck = make_checkpoint(tmp_path / "narrow", "tiny", hidden_size=128)
    other = convert(ck, tmp_path / "narrow-out", mmproj_type="f32", write_lm=False, progress=False).mmproj_path
    line = run_error(run_cli(["--model", files[0], "--mmproj", other, "hi"]))
    assert "128" in line and "256" in line and other.name in line
    with pytest.raises(ModelFileError):
        MiniCPMV.load(files[0], other)


def test_cli_unreadable_image(files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a picture")
    line = run_error(run_cli(["--model", files[0], "--mmproj", files[1], bad, "What is it?"]))
    assert "bad.png" in line
    line = run_error(run_cli(["--model", files[0], "--mmproj", files[1], tmp_path / "gone.jpg", "What?"]))
    assert "gone.jpg" in line


def test_cli_context_overflow(files, tmp_path):
    pic = tmp_path / "big.png"
    picture(1344, 1344).save(pic)
    line = run_error(
        run_cli(["--model", files[0], "--mmproj", files[1], pic, "?", "--ctx", "256", "--vision-dtype", "f32"])
    )
    assert "n_ctx=256" in line and "needs" in line


def test_model_folder_is_told_apart_by_metadata(files, tmp_path):
    lm, mm = files
    d = tmp_path / "models"
    d.mkdir()
    (d / "a.gguf").symlink_to(mm)  # names say nothing: metadata decides
    (d / "b.gguf").symlink_to(lm)
    with MiniCPMV.load(d, n_ctx=512, n_threads=1, vision_dtype="f32") as m:
        assert m.lm.path.name == "b.gguf" and m.vision.path.name == "a.gguf"
    (d / "c.gguf").symlink_to(lm)
    with pytest.raises(ModelFileError, match="several candidate files"):
        MiniCPMV.load(d)


def test_cli_interactive_session(files, tmp_path):
    pic = tmp_path / "pic.png"
    picture(448, 448, seed=11).save(pic)
    from typer.testing import CliRunner

    from minicpmv.cli.run import app

    script = f"/image {pic}\nWhat is it?\n/think\nWhy?\n/nope\n/reset\nHello\n/quit\n"
    res = CliRunner().invoke(
        app,
        [
            "--model",
            str(files[0]),
            "--mmproj",
            str(files[1]),
            "--max-tokens",
            "4",
            "--greedy",
            "--vision-dtype",
            "f32",
            "-v",
        ],
        input=script,
    )
    assert res.exit_code == 0, res.stderr
    err = res.stderr
    assert "(added" in err and "(thinking on)" in err and "unknown command /nope" in err
    assert "(conversation cleared)" in err
    # turn 2 reused the cache (prefill from a later position), the turn after /reset started over
    starts = [int(x.split("from position ")[1].split()[0]) for x in err.splitlines() if "from position" in x]
    assert len(starts) == 3 and starts[0] == 0 and starts[1] > 64 and starts[2] == 0


def test_content_paths_and_video_items(model, tmp_path):
    from minicpmv.runtime import Video, load_video

    from .video_fixtures import make_video

    pic = tmp_path / "pic.png"
    img = picture(448, 448, seed=13)
    img.save(pic)
    a = model.build_prompt([{"role": "user", "content": [img, "What?"]}])
    b = model.build_prompt([{"role": "user", "content": [pic, "What?"]}])  # a pathlib.Path is a file
    assert model.prompt_token_ids(b) == model.prompt_token_ids(a)

    clip = make_video(tmp_path / "clip.mp4", 12, 6, size=(64, 48))  # 2 s at 6 fps
    v = load_video(clip, fps=5, packing=2)
    ref = model.build_prompt(
        [{"role": "user", "content": list(v.frames) + ["What happens?"]}],
        use_image_id=False,
        max_slice_nums=1,
        temporal_ids=v.temporal_ids,
    )
    for item in (Video(clip, packing=2), Video(clip.read_bytes(), packing=2), v):
        p = model.build_prompt([{"role": "user", "content": [item, "What happens?"]}])
        assert model.prompt_token_ids(p) == model.prompt_token_ids(ref)
        assert [m.temporal_ids for m in p.media] == [list(g) for g in v.temporal_ids]
    p = model.build_prompt([{"role": "user", "content": [clip, "What happens?"]}])
    assert len(p.media) == len(load_video(clip).temporal_ids) and "<image_id>" not in p.text
    model.reset()
    model.prefill([{"role": "user", "content": [Video(clip, packing=2), "What happens?"]}])
    assert model.stats.images_encoded == len(v.temporal_ids) == model.stats.slots_prefilled
    with pytest.raises(ValueError, match="not both"):
        model.build_prompt([{"role": "user", "content": [v, "?"]}], temporal_ids=[[0]])
    for bad, says in (({"image": pic}, "type dict"), (b"\x89PNG", "type bytes")):
        with pytest.raises(ValueError, match=says):
            model.build_prompt([{"role": "user", "content": [bad, "?"]}])
    with pytest.raises(ValueError, match="assistant messages hold text only"):
        model.build_prompt(
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [img]},
                {"role": "user", "content": "?"},
            ]
        )


def test_text_is_text_even_when_it_names_a_file(model, tmp_path, monkeypatch):
    """A str is never opened: a question (or a past answer) that is the path of an existing image
    or video is answered as text, as the reference chat() does (issue 28)."""
    from PIL import Image

    from .video_fixtures import make_video

    pic, clip = tmp_path / "secret.png", make_video(tmp_path / "secret.mp4", 6, 6, size=(32, 32))
    picture(448, 448, seed=14).save(pic)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    before = model.content.opened
    for path in (str(pic), str(clip)):
        msgs = [
            {"role": "user", "content": [path]},
            {"role": "assistant", "content": path},  # "answer with exactly /path/x.png"
            {"role": "user", "content": path},
        ]
        p = model.build_prompt(msgs)
        assert not p.media and p.text.count(path) == 3 and model.content.opened == before
        model.reset()
        a = model.chat(msgs, greedy=True, max_new_tokens=4)
        assert a.stats.images_encoded == 0 and a.stats.slots_prefilled == 0
    assert opened == []


def test_gguf_peek_matches_gguf_py(files, tmp_path):
    import gguf

    from minicpmv.gguf_info import GGUFFormatError, read_gguf_info

    for path in files:
        info = read_gguf_info(path)
        r = gguf.GGUFReader(str(path))
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.types[0] == gguf.GGUFValueType.ARRAY:
                continue
            assert info.metadata[f.name] == pytest.approx(f.contents()), f.name
        for t in r.tensors:
            mine = info.tensors[t.name]
            assert mine.offset == t.data_offset and mine.ggml_type == t.tensor_type
            assert list(mine.shape) == [int(x) for x in t.shape]
        emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
        if emb is not None:
            ids = [0, 5, int(emb.shape[1]) - 1]
            ref = gguf.quants.dequantize(np.asarray(emb.data)[ids], emb.tensor_type)
            from minicpmv.runtime.model_file import ModelFile

            np.testing.assert_array_equal(ModelFile(path).rows("token_embd.weight", ids), ref.reshape(len(ids), -1))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 10)
    with pytest.raises(GGUFFormatError):
        read_gguf_info(bad)
    with pytest.raises(ModelFileError, match="bad.gguf: truncated: the GGUF header needs 24 bytes, the file has 18$"):
        MiniCPMV.load(bad, files[1])
