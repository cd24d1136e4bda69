"""The conversation logic behind `minicpm-run --web` (no browser), and the CLI's --web checks.

The page itself is driven in a real browser by test_web_browser.py; here the stop path is checked
where the browser cannot see it: the stream really ends (its generator's cleanup records the decode
counters), a closed tab leaves the model usable, and a bad upload leaves the conversation as it was.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest

from minicpmv.cli.web_chat import LocalChat, Session
from minicpmv.runtime import MiniCPMV
from minicpmv.session.limits import Limits
from minicpmv.session.options import ChatOptions, MediaOptions

from .helpers import one_error_line, run_cli

OPTS = ChatOptions(max_tokens=2000, greedy=True)
SHORT = dataclasses.replace(OPTS, max_tokens=16)


@pytest.fixture(scope="module")
def chat(tiny_real_vocab_gguf):
    """Long answers (the real vocabulary rarely samples an end token) so that they can be stopped."""
    m = MiniCPMV.load(*tiny_real_vocab_gguf, n_ctx=4096, n_threads=1)
    yield LocalChat(m, OPTS, MediaOptions(), Limits())
    m.close()


def test_stop_ends_the_stream_and_keeps_the_partial_answer(chat):
    s = Session()
    assert chat.ask(s, "Tell me a long story.", [])
    gen = chat.answer(s, OPTS)
    for _ in range(4):  # a few redraws into the answer
        next(gen)
    assert s.busy and s.turns[-1].answer
    chat.stop(s)
    list(gen)
    turn, stats = s.turns[-1], chat.model.stats
    assert turn.done and not s.busy and turn.footer.endswith("stopped")
    # the decode counters are written by the stream's own cleanup: it was closed, not abandoned
    assert 0 < stats.decode_tokens < OPTS.max_tokens and f"decode {stats.decode_tokens} tok" in turn.footer
    assert s.conv.msgs[-1] == {"role": "assistant", "content": turn.answer}

    # the next question goes on from the cache (the first turn's prompt is not decoded again)
    assert chat.ask(s, "Go on.", [])
    list(chat.answer(s, SHORT))
    assert chat.model.stats.prefill_start > 0 and s.turns[-1].answer
    assert not chat.model.busy


def test_a_closed_tab_ends_its_answer_and_frees_the_model(chat):
    s = Session()
    chat.ask(s, "Tell me a long story.", [])
    gen = chat.answer(s, OPTS)
    next(gen), next(gen)
    gen.close()  # what Gradio does when the tab goes away
    assert not s.busy and chat.answering == 0 and not chat.model.busy
    assert chat.model.stats.decode_tokens > 0
    assert s.turns[-1].footer == "stopped" and s.conv.msgs[-1] == {"role": "assistant", "content": s.turns[-1].answer}
    other = Session()
    assert chat.ask(other, "Hello", [])
    list(chat.answer(other, SHORT))
    assert other.turns[-1].footer and not other.error


def test_bad_upload_names_the_file_and_keeps_the_conversation(chat, tmp_path):
    s = Session()
    chat.ask(s, "Hello", [])
    list(chat.answer(s, SHORT))
    msgs = list(s.conv.msgs)
    bad = tmp_path / "upload-dir" / "photo.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert not chat.ask(s, "What is this?", [str(bad)])
    assert s.error.startswith("photo.jpg: ") and str(bad.parent) not in s.error and "\n" not in s.error
    assert s.conv.msgs == msgs and len(s.turns) == 1


def test_a_full_context_drops_the_question_with_one_line(chat):
    s = Session()
    chat.ask(s, "Hello", [])
    list(chat.answer(s, SHORT))
    msgs = list(s.conv.msgs)
    chat.ask(s, "word " * 5000, [])  # more than the 4096-token context
    list(chat.answer(s, SHORT))
    assert "n_ctx=4096" in s.error and "\n" not in s.error
    assert s.conv.msgs == msgs and len(s.turns) == 1 and not s.busy


def test_bad_sampling_setting_drops_the_question(chat):
    s = Session()
    chat.ask(s, "Hello", [])
    chat.reject(s, "Temperature: 'hot' is not a number")
    assert s.conv.msgs == [] and s.turns == [] and s.error.startswith("Temperature")


# --------------------------------------------------------------------------- CLI


def test_cli_web_refuses_inputs_and_json():
    for args, says in (
        (["photo.jpg", "What is it?"], "--web takes no files or question"),
        (["--json"], "--json does not apply to --web"),
    ):
        line = one_error_line(run_cli("minicpm-run", "--web", "--model-dir", "models", *args), prog="minicpm-run")
        assert line.startswith(f"minicpm-run: error: {says}")


def test_cli_web_refuses_an_open_host_without_a_login_and_names_a_taken_port():
    res = run_cli("minicpm-run", "--web", "--model-dir", "models", "--host", "0.0.0.0", "--port", "7860")
    line = one_error_line(res, prog="minicpm-run")
    assert line.startswith(
        "minicpm-run: error: --host 0.0.0.0 makes this reachable from other machines: "
        "give --auth USER:PASSWORD, or --no-auth"
    )
    with socket.socket() as held:  # bound, never listening: the port is taken
        held.bind(("0.0.0.0", 0))
        port = held.getsockname()[1]
        for extra in (["--no-auth"], ["--auth", "ann:secret"]):
            res = run_cli("minicpm-run", "--web", "--model-dir", "models", "--host", "0.0.0.0", "--port", port, *extra)
            assert one_error_line(res).startswith(f"minicpm-run: error: cannot listen on 0.0.0.0:{port} ")


def test_auth_entries(tmp_path):
    from minicpmv.cli.web import read_auth

    assert read_auth(None) is None and read_auth("ann:a:b") == [("ann", "a:b")]
    f = tmp_path / "logins"
    f.write_text("# page users\nann:one\n\nbob:two\n")
    assert read_auth(str(f)) == [("ann", "one"), ("bob", "two")]
    for bad, says in (("annonly", "--auth: expected USER:PASSWORD"), (":pw", "expected USER:PASSWORD")):
        with pytest.raises(ValueError, match=says):
            read_auth(bad)
    f.write_text("ann:one\nbob\n")
    with pytest.raises(ValueError, match="line 2: expected USER:PASSWORD"):
        read_auth(str(f))


def test_is_loopback():
    from minicpmv.cli.listen import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
