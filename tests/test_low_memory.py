"""The low-memory profile (`MiniCPMV.load(low_memory=True)`, `minicpm-run --low-memory`): q8_0 KV cache
and vision weights read from the mmproj per image. Its first-token logits stay within a stated bound
of the default profile's (the q8_0 cache is the only numerical difference: the streamed vision
weights give bit-identical embeddings), and it keeps what it promises (no tower weights resident,
a q8_0 cache of 34/64 the f16 bytes). Peak memory is measured by `make bench` (BENCHMARKS.md §5b)."""

from __future__ import annotations

import pytest

from minicpmv.runtime import MiniCPMV

from .test_runtime_chat import one_error_line, picture, rel_err, run_cli

# measured 1.0e-3 on the tiny model (q8_0 rounds K and V to 8 bits per value in blocks of 32)
LOW_MEMORY_LOGIT_TOL = 5e-3


@pytest.fixture(scope="module")
def files16(tiny_lm_gguf, tiny_mmproj_gguf):
    """The f16 mmproj: the streamed weights are converted straight to the compute dtype."""
    return tiny_lm_gguf("F32"), tiny_mmproj_gguf("f16")


def msgs():
    return [{"role": "user", "content": [picture(900, 700, seed=4), "What is in the image?"]}]


def first_logits(files16, **kw):
    m = MiniCPMV.load(*files16, n_threads=2, **kw)
    changes = []
    m.watch_context(changes.append)
    logits = m.prefill(msgs())
    return m, logits, changes[-1]


def test_low_memory_first_token_parity(files16):
    base, want, c_base = first_logits(files16)
    low, got, c_low = first_logits(files16, low_memory=True)
    assert rel_err(got, want) < LOW_MEMORY_LOGIT_TOL and got.argmax() == want.argmax()
    assert low.vision.blocks is None and base.vision.blocks is not None
    assert c_low.kv_bytes * 64 == c_base.kv_bytes * 34 and c_low.n_ctx == c_base.n_ctx
    # the streamed vision weights alone change nothing: with an f16 cache the logits are identical
    _, same, _ = first_logits(files16, low_memory=True, kv_type="f16")
    assert (same == want).all()


def test_bad_kv_options_are_one_line_errors(files16):
    with pytest.raises(ValueError, match="kv_type"):
        MiniCPMV.load(*files16, kv_type="q4_0")
    with pytest.raises(ValueError, match="flash attention"):
        MiniCPMV.load(*files16, kv_type="q8_0", flash_attn=False)
    line = one_error_line(
        run_cli([picture_file(files16), "q", "--model", files16[0], "--mmproj", files16[1], "--kv-type", "q4_0"])
    )
    assert "kv_type" in line and "q8_0" in line


def picture_file(files16) -> str:
    p = files16[0].parent / "low-memory-picture.png"
    if not p.exists():
        picture(320, 240).save(p)
    return str(p)


def test_cli_low_memory_answers(files16):
    res = run_cli(
        [
            picture_file(files16),
            "What is in the image?",
            "--model",
            files16[0],
            "--mmproj",
            files16[1],
            "--low-memory",
            "--greedy",
            "-n",
            "4",
            "--json",
            "--verbose",
        ]
    )
    assert res.exit_code == 0, res.stderr
    assert "KV cache" in res.stderr and '"answer"' in res.stdout


def test_first_turn_encodes_images_before_the_kv_cache_exists(files16):
    """Even with a fixed n_ctx the context (KV cache, compute buffer) is made after the first turn's
    images are encoded, so the two are never resident together on a first turn."""
    m = MiniCPMV.load(*files16, n_ctx=2048, n_threads=2)
    assert m.ctx is None
    seen, encode = [], m.vision.encode_slices

    def watched(*a, **k):
        seen.append(m.ctx is None)
        return encode(*a, **k)

    m.vision.encode_slices = watched
    m.prefill(msgs())
    assert seen == [True] and m.ctx.n_ctx == 2048
