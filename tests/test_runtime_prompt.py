"""Prompt parity with the reference, on the REAL 151,748-token vocabulary.

Our side: runtime.prompt builds the segments, llama.cpp (via runtime.llama, on a GGUF converted from
a tiny checkpoint that carries the published tokenizer) tokenizes the text pieces, slots shown as
the `<unk>` id. Reference side, written here independently from the reference's rules
(docs/reference-model.md §5): the checkpoint's Jinja chat template rendered by transformers'
`apply_chat_template`, the processor's tag expansion (placeholder, image ids, slice rows, temporal
groups) re-stated below, and the Hugging Face tokenizer of the same files.
"""

from __future__ import annotations

import math
import re

import pytest
from PIL import Image

from minicpmv.runtime.llama import LlamaModel
from minicpmv.runtime.prompt import PromptError, build_prompt, render_chat

UNK_ID = 128244  # docs/reference-model.md §1.3


@pytest.fixture(scope="module")
def real(real_vocab):
    _, lm_path, tok = real_vocab
    lm = LlamaModel(lm_path, vocab_only=True)
    yield lm, tok
    lm.close()


# --------------------------------------------------------------------------- reference side


def ref_grid(w: int, h: int, max_slice_nums: int) -> tuple[int, int] | None:
    """get_sliced_grid of the reference image processor (docs/reference-model.md §4.2)."""
    log_ratio = math.log(w / h)
    multiple = min(math.ceil(w * h / (448 * 448)), max_slice_nums)
    if multiple <= 1:
        return None
    best, err = [1, 1], float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for m in range(1, n + 1):
            if n % m == 0 and abs(log_ratio - math.log(m / (n // m))) < err:
                best, err = [m, n // m], abs(log_ratio - math.log(m / (n // m)))
    return tuple(best)


def ref_placeholder(size, i: int, max_slice_nums: int, use_image_id: bool) -> str:
    unk = "<unk>" * 64
    s = f"<image_id>{i}</image_id>" if use_image_id else ""
    s += f"<image>{unk}</image>"
    g = ref_grid(*size, max_slice_nums)
    if g:
        s += "\n".join(["".join([f"<slice>{unk}</slice>"] * g[0])] * g[1])
    return s


def reference_ids(
    tok, msgs, *, enable_thinking=False, system_prompt="", max_slice_nums=9, use_image_id=True, temporal_ids=None
) -> list[int]:
    """modeling chat() message handling + apply_chat_template + processor expansion + HF tokenizer."""
    copy, images = [], []
    for m in msgs:
        content = [m["content"]] if isinstance(m["content"], str) else m["content"]
        parts = []
        for c in content:
            if isinstance(c, Image.Image):
                images.append(c)
                parts.append("(<image>./</image>)")
            else:
                parts.append(c)
        copy.append({"role": m["role"], "content": "\n".join(parts)})
    if system_prompt:
        copy = [{"role": "system", "content": system_prompt}] + copy
    text = tok.apply_chat_template(copy, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    skip = set()
    if temporal_ids is not None:
        k = 0
        for g in temporal_ids:
            skip.update(range(k + 1, k + len(g)))
            k += len(g)
    pattern = "(<image>./</image>)"
    assert len(re.findall(re.escape(pattern), text)) == len(images)
    chunks = text.split(pattern)
    final = ""
    for i in range(len(images)):
        if i in skip:
            final += chunks[i].strip()
        else:
            final += chunks[i] + ref_placeholder(images[i].size, i, max_slice_nums, use_image_id)
    final += chunks[-1]
    return tok.encode(final)


def ours_ids(lm, msgs, **kw) -> list[int]:
    p = build_prompt(msgs, **kw)
    return p.token_ids(lm.tokenize, lm.token_id("<unk>"))


def img(w, h):
    return Image.new("RGB", (w, h), (120, 30, 200))


# --------------------------------------------------------------------------- cases

A, B, C = img(448, 448), img(640, 480), img(300, 200)  # B: 2x1 grid; C: upscaled, no grid
WIDE = img(1344, 1344)  # 3x3 grid
Q = "What is in the image? 描述一下 😀 123"

CASES = {
    "0 images": ([{"role": "user", "content": "Hello, who are you?"}], {}),
    "0 images thinking": ([{"role": "user", "content": ["Hi!", "Solve 12*7."]}], {"enable_thinking": True}),
    "1 image": ([{"role": "user", "content": [A, Q]}], {}),
    "1 image thinking + system": (
        [{"role": "user", "content": [A, Q]}],
        {"enable_thinking": True, "system_prompt": "You are terse."},
    ),
    "3 images one sliced": ([{"role": "user", "content": [A, B, C, "Compare them."]}], {}),
    "3 images 3x3 no image id": ([{"role": "user", "content": [C, WIDE, A, "Compare."]}], {"use_image_id": False}),
    "3 images max 2 slices": ([{"role": "user", "content": [B, WIDE, A, "Compare."]}], {"max_slice_nums": 2}),
    "text after image and between": ([{"role": "user", "content": ["First:", A, "then", B, "?"]}], {}),
    "few-shot": (
        [
            {"role": "user", "content": [A, "What is this?"]},
            {"role": "assistant", "content": ["A purple square."]},
            {"role": "user", "content": [C, "What is this?"]},
            {"role": "assistant", "content": "A small purple picture."},
            {"role": "user", "content": [B, "What is this?"]},
        ],
        {},
    ),
    "multi-turn past think, thinking off": (
        [
            {"role": "user", "content": [B, Q]},
            {"role": "assistant", "content": "<think>\nLet me look.\nIt is purple.\n</think>\n\nA purple image."},
            {"role": "user", "content": "Are you sure?"},
        ],
        {},
    ),
    "multi-turn past think, thinking on": (
        [
            {"role": "user", "content": [B, Q]},
            {"role": "assistant", "content": "<think>\nLet me look.\n</think>\n\nA purple image."},
            {"role": "user", "content": [A, "And this one?"]},
            {"role": "assistant", "content": ["Also purple."]},
            {"role": "user", "content": "Why?"},
        ],
        {"enable_thinking": True},
    ),
    "video groups": (
        [{"role": "user", "content": [A, A, A, A, A, "Describe the video."]}],
        {"use_image_id": False, "max_slice_nums": 1, "temporal_ids": [[0, 1, 2], [3, 4]]},
    ),
    "video groups sliced": (
        [{"role": "user", "content": [B, B, B, "Describe."]}],
        {"use_image_id": False, "max_slice_nums": 4, "temporal_ids": [[0, 1], [2]]},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_ids_match_reference(real, name):
    lm, tok = real
    msgs, kw = CASES[name]
    ours = ours_ids(lm, msgs, **kw)
    ref = reference_ids(tok, msgs, **kw)
    assert ours == ref
    n_images = sum(isinstance(c, Image.Image) for m in msgs if isinstance(m["content"], list) for c in m["content"])
    if n_images and "temporal_ids" not in kw:
        assert ours.count(UNK_ID) >= 64 * n_images


def test_slot_layout_and_unk_id(real):
    lm, _ = real
    assert lm.token_id("<unk>") == UNK_ID
    p = build_prompt([{"role": "user", "content": [B, "?"]}])
    assert p.media[0].grid == (2, 1) and p.media[0].n_slots == 3
    slots = [s for s in p.segments if not isinstance(s, str)]
    assert [(s.media_index, s.index) for s in slots] == [(0, 0), (0, 1), (0, 2)]
    # the grid follows the overview immediately and slices of a row are adjacent
    texts = [s for s in p.segments if isinstance(s, str)]
    assert texts[0].endswith("<image_id>0</image_id><image>")
    assert texts[1] == "</image><slice>" and texts[2] == "</slice><slice>"


def test_render_matches_template_for_odd_histories(real):
    """Assistant turns after the last user turn (kept think blocks), empty reasoning, system."""
    _, tok = real
    cases = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nb"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "x</think>y"},
            {"role": "assistant", "content": "z"},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\n\n</think>\n\n\nb"},
            {"role": "user", "content": "c"},
        ],
    ]
    for msgs in cases:
        for think in (None, False, True):
            kw = {} if think is None else {"enable_thinking": think}
            for gen in (False, True):
                ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
                assert render_chat(msgs, enable_thinking=think, add_generation_prompt=gen) == ref


def test_bad_conversations():
    with pytest.raises(PromptError, match="first message"):
        build_prompt([{"role": "assistant", "content": "x"}])
    with pytest.raises(PromptError, match="role"):
        build_prompt([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(PromptError, match="temporal_ids"):
        build_prompt([{"role": "user", "content": [A, A, "?"]}], temporal_ids=[[0, 1, 2]])
    with pytest.raises(PromptError, match="empty"):
        build_prompt([])
