"""What a running model reads from outside itself after its load (issue 28, points 3 and 5).

- Model files are opened once (runtime/model_file.py): `minicpm-convert --force` into the folder a
  loaded model came from puts new inodes under the old names, and the model must go on answering
  from the files it loaded: the token-embedding rows (runtime/token_embeddings.py) and, in the
  low-memory profile, the vision weights streamed per image (vision_weights.FileTensors) are read
  through the descriptors opened at load, never by name.
- `n_ctx` above the model's trained context is refused with one line, by the API and by the CLI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from minicpmv.convert.pipeline import convert
from minicpmv.convert.synthetic import make_checkpoint
from minicpmv.runtime import MiniCPMV

from .helpers import one_error_line, run_in_process
from .test_runtime_chat import picture

LM_TYPE, MM_TYPE = "Q8_0", "f16"  # token_embd rows dequantized by gguf-py; f16 vision weights streamed
TOKENS = 8


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    """The tiny checkpoint with other weights (seed 1): its conversion answers differently."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-other") / "tiny", "tiny", seed=1)


def question() -> list[dict]:
    # an image: the answer depends on the mmproj (streamed in the low-memory profile) and on the
    # token_embd rows of its placeholder, both read at the first chat
    return [{"role": "user", "content": [picture(320, 240, seed=3), "What is in the image?"]}]


def load(folder: Path, low_memory: bool) -> MiniCPMV:
    return MiniCPMV.load(folder, n_threads=2, vision_dtype="f32", low_memory=low_memory)


def ask(m: MiniCPMV) -> list[int]:
    return list(m.chat(question(), greedy=True, max_new_tokens=TOKENS).tokens)


def on_disk(folder: Path) -> dict[str, tuple[int, str]]:
    """GGUF file name -> (inode, sha256 of its bytes)."""
    return {
        p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.glob("*.gguf"))
    }


def replace_files(how: str, other_ckpt: Path, folder: Path, staging: Path) -> None:
    """New files under the names the model was loaded from, both ways a user gets there."""
    if how == "force":  # the same types again, from other weights: the very names are rewritten
        args = ["-o", folder, "--quant", LM_TYPE, "--mmproj-type", MM_TYPE, "--force"]
    else:  # another type (other offsets and tensor types: read at the old offsets, garbage)
        args = ["-o", staging, "--quant", "F16", "--mmproj-type", "f32"]
    res = run_in_process("minicpm-convert", other_ckpt, *args, "--quiet")
    assert res.exit_code == 0, res.stderr
    if how == "force":
        return
    # renamed over the old names, as --force does
    old = sorted(folder.glob("*.gguf"), key=lambda p: p.name.startswith("mmproj"))
    new = sorted(staging.glob("*.gguf"), key=lambda p: p.name.startswith("mmproj"))
    assert len(old) == len(new) == 2
    for src, dst in zip(new, old):
        os.replace(src, dst)


@pytest.mark.parametrize("how", ["force", "other-type"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
def test_files_replaced_under_a_loaded_model_change_no_answer(tiny_ckpt, other_ckpt, tmp_path, low_memory, how):
    folder = tmp_path / "model"
    convert(tiny_ckpt, folder, quant_type=LM_TYPE, mmproj_type=MM_TYPE, progress=False)
    before = on_disk(folder)
    asked = load(folder, low_memory)
    # loaded before the replacement, asked only after it: every row, streamed weight and context it
    # needs is read after the files changed (`asked` has its rows and image embeddings cached)
    waiting = load(folder, low_memory)
    want = ask(asked)

    replace_files(how, other_ckpt, folder, tmp_path / "staging")
    after = on_disk(folder)
    assert after.keys() == before.keys()
    for name in before:  # new inodes with other bytes under the same names
        assert after[name][0] != before[name][0] and after[name][1] != before[name][1], name
    # the loaded models still hold the files they opened
    for m in (asked, waiting):
        assert os.fstat(m.lm.file.fd).st_ino == before[m.lm.path.name][0]
        assert os.fstat(m.vision.file.fd).st_ino == before[Path(m.vision.path).name][0]

    assert ask(waiting) == want
    asked.reset()
    assert ask(asked) == want
    # the new files answer otherwise: reading them by name would have changed the answer
    fresh = load(folder, low_memory)
    assert ask(fresh) != want
    for m in (asked, waiting, fresh):
        m.close()


# --------------------------------------------------------------------------- the trained context


def test_ctx_above_the_trained_context_is_one_line_error(files):
    lm, mm = files
    with MiniCPMV.load(lm, mm, n_threads=2, vision_dtype="f32") as m:
        trained = m.lm.n_ctx_train
    assert trained > 0
    with pytest.raises(ValueError) as e:
        MiniCPMV.load(lm, mm, n_ctx=trained + 1, n_threads=2, vision_dtype="f32")
    msg = str(e.value)
    assert "\n" not in msg and str(trained + 1) in msg and str(trained) in msg.replace(str(trained + 1), "")
    # the trained context itself is allowed (the bound is inclusive); the context is made at the first prefill
    with MiniCPMV.load(lm, mm, n_ctx=trained, n_threads=2, vision_dtype="f32") as m:
        m.prefill([{"role": "user", "content": "hello"}])
        assert m.ctx.n_ctx == trained

    res = run_in_process("minicpm-run", "hello", "--model", lm, "--mmproj", mm, "--ctx", trained + 1, "-n", 2)
    line = one_error_line(res, str(trained + 1), prog="minicpm-run", code=2)
    assert str(trained) in line.replace(str(trained + 1), "")


def test_a_question_naming_a_file_is_text_on_the_cli_and_the_page(files, tmp_path):
    """Text is text on every front end (issue 28): a question that names an existing image is
    answered as words; the image is never opened (the turn's counters show no image)."""
    import json

    from minicpmv.cli.web_chat import LocalChat, Session
    from minicpmv.session.limits import Limits
    from minicpmv.session.options import ChatOptions, MediaOptions

    pic = tmp_path / "secret.png"
    picture(448, 448, seed=40).save(pic)
    res = run_in_process(
        "minicpm-run",
        "--model",
        files[0],
        "--mmproj",
        files[1],
        "-t",
        "1",
        "--json",
        "--greedy",
        "-n",
        "4",
        f"What is in {pic}?",
    )
    assert res.exit_code == 0, res.stderr
    timings = json.loads(res.stdout.strip().splitlines()[-1])["timings"]
    assert timings["images_encoded"] == 0 and timings["slots_prefilled"] == 0

    m = MiniCPMV.load(*files, n_threads=1, vision_dtype="f32")
    try:
        chat = LocalChat(m, ChatOptions(max_tokens=4, greedy=True), MediaOptions(), Limits())
        s = Session()
        assert chat.ask(s, str(pic), [])  # the whole question is the path
        list(chat.answer(s, chat.opts))
        assert not s.error and s.turns[-1].images == [] and m.stats.images_encoded == 0
        assert m.stats.slots_prefilled == 0 and s.conv.msgs[0]["content"] == [str(pic)]
    finally:
        m.close()
