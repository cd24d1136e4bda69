"""`minicpm-run --web` in a real browser: Debian's Chromium (headless, installed by .ci/run) driven by
Playwright, against pages served by the CLI on the tiny synthetic model (conftest's tiny_lm_gguf /
tiny_mmproj_gguf), and, for Stop and the queue, on the tiny model with the real vocabulary, whose
answers run long enough to be stopped (conftest.tiny_real_vocab_ckpt).

The oracle for what the page shows is the Python API: the same conversation through
`MiniCPMV.chat()` (greedy, so deterministic) must give the same answer, reasoning and token counts,
including the KV-cache reuse of a follow-up question. A screenshot of the chat is saved to
$MINICPMV_TEST_ARTIFACTS (default: test-artifacts/ in the repository).
"""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv.runtime import MiniCPMV
from minicpmv.runtime.image import load_image
from minicpmv.runtime.video import load_video

from .processes import free_port, page_process
from .video_fixtures import make_video

CHROMIUM = "/usr/bin/chromium"
# The network is closed here: without the background-networking flags Chromium waits on refused
# connections (component updates, sync, QUIC probes).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("MINICPMV_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
PAGE_MAX_TOKENS = 24  # the server's --max-tokens: short answers
LONG = 4000  # max tokens of an answer that is stopped (~15 s at the tiny model's speed)
WAIT_MS = 120_000
# f32 KV cache, no flash attention, on the page and its oracle: logits that do not depend on how the
# positions were batched or what the cache held before (f16 moves them by ~1e-4 of their range, which
# flips near-ties of a seeded sampler and, rarely, a greedy answer's length)
EXACT = ["--kv-type", "f32", "--no-flash-attn"]

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("web-media")
    y, x = np.mgrid[0:240, 0:320]
    pic = np.stack([x * 255 / 320, y * 255 / 240, np.full_like(x, 96.0)], -1).astype(np.uint8)
    Image.fromarray(pic).save(d / "pic.png")
    clip = make_video(d / "clip.mp4", 30, 10)  # 3 s at 10 fps: 15 frames at 5 fps, 5 groups of 3
    (d / "bad.jpg").write_bytes(b"this is not a JPEG" * 20)
    (d / "broken.mp4").write_bytes(clip.read_bytes()[:300])
    return {p.name: p for p in d.iterdir()}


@contextmanager
def serving(lm: Path, mm: Path, log_path: Path):
    """The page as a user starts it, with CLI options that it must honour (packing, greedy, tokens)."""
    port = free_port()
    with page_process(
        [
            sys.executable,
            "-m",
            "minicpmv.cli.run",
            "--web",
            "--model",
            str(lm),
            "--mmproj",
            str(mm),
            "--port",
            str(port),
            "--threads",
            "1",
            "--packing",
            "3",
            "--greedy",
            "--max-tokens",
            str(PAGE_MAX_TOKENS),
            *EXACT,
        ],
        port,
        log_path,
        start_s=120,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def tiny(tiny_lm_gguf, tiny_mmproj_gguf):
    return tiny_lm_gguf("F32"), tiny_mmproj_gguf("f32")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """The page on the tiny model (its answers end by themselves within ~0.1 s)."""
    with serving(*tiny, tmp_path_factory.mktemp("web") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def long_server(tiny_real_vocab_gguf, tmp_path_factory):
    """The page on the tiny model with the real vocabulary: its answers run long enough to stop."""
    with serving(*tiny_real_vocab_gguf, tmp_path_factory.mktemp("web-long") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 960, "height": 1000},
        )
        ctx.set_default_timeout(WAIT_MS)
        yield ctx
        ctx.close()


def _tabs(browser, url: str):
    """Opens chat tabs; closes them after the test (each open tab holds HTTP connections, and
    Chromium allows 6 per host: with more, a click's request waits for a free one)."""
    tabs = []

    def open_one() -> "ChatTab":
        tabs.append(ChatTab(browser, url))
        return tabs[-1]

    yield open_one
    for t in tabs:
        t.page.close()


@pytest.fixture
def open_tab(server, browser):
    yield from _tabs(browser, server)


@pytest.fixture
def open_long_tab(long_server, browser):
    yield from _tabs(browser, long_server)


def _api(lm: Path, mm: Path):
    """The same model through the Python API: the oracle (the page's settings: 1 thread, exact KV)."""
    m = MiniCPMV.load(lm, mm, n_threads=1, kv_type="f32", flash_attn=False)
    yield m
    m.close()


@pytest.fixture(scope="module")
def api(tiny):
    yield from _api(*tiny)


@pytest.fixture(scope="module")
def long_api(tiny_real_vocab_gguf):
    yield from _api(*tiny_real_vocab_gguf)


# --------------------------------------------------------------------------- the page, as a person uses it

FOOTER = re.compile(
    r"(?:vision (?P<vision_ms>[\d.]+) ms/slice × (?P<slices>\d+) · )?"
    r"prefill (?P<prefill>\d+)/(?P<prompt>\d+) tok, [\d.]+ tok/s · decode (?P<decode>\d+) tok, [\d.]+ tok/s · "
    r"first token \d+ ms · (?P<end>stopped|stop|length|context)"
)


class ChatTab:
    def __init__(self, browser, url: str):
        self.page = browser.new_page()
        self.page.goto(url)
        self.page.locator("#msg textarea").wait_for()

    def attach(self, *files: Path) -> None:
        self.page.locator("#msg input[type=file]").set_input_files([str(f) for f in files])
        # uploaded: one thumbnail per file in the box
        self.page.locator("#msg [aria-label='File thumbnail']").nth(len(files) - 1).wait_for()

    def remove_files(self) -> None:
        while self.page.locator("#msg [aria-label='Remove file']").count():
            self.page.locator("#msg [aria-label='Remove file']").first.click()

    def setting(self, elem_id: str, value: str) -> None:
        if not self.page.locator(f"#{elem_id}").is_visible():
            self.page.locator("#sampling").click()
        # A value typed right after the accordion opens was seen back at the field's initial value a
        # moment later (then the question went out with the server's default), about one run in
        # three: type, leave the field as a person does, and type again until the value stays.
        box = self.page.locator(f"#{elem_id} input")
        for _ in range(20):
            box.fill(value)
            box.press("Tab")
            self.page.wait_for_timeout(250)
            if box.input_value() == value:
                return
        raise AssertionError(f"#{elem_id} keeps reverting to {box.input_value()!r} instead of {value!r}")

    def ask(self, text: str) -> None:
        self.page.locator("#msg textarea").fill(text)
        self.page.locator("#msg textarea").press("Enter")

    def messages(self) -> list[dict]:
        """Chat messages in order: role, text (the message's raw text, from its aria-label), kind."""
        return self.page.eval_on_selector_all(
            "#chat [data-testid=user], #chat [data-testid=bot]",
            """els =>
            els.map(e => ({role: e.dataset.testid, label: e.getAttribute('aria-label') || '',
                           thought: !!e.querySelector('.thought-group'), images: e.querySelectorAll('img').length,
                           text: e.innerText}))""",
        )

    def footers(self) -> list[str]:
        return [m["text"] for m in self.messages() if m["role"] == "bot" and FOOTER.search(m["text"])]

    def wait_footers(self, n: int) -> re.Match:
        self.page.wait_for_function(
            "n => [...document.querySelectorAll('#chat [data-testid=bot] small')]"
            ".filter(e => e.innerText.includes(' tok/s')).length >= n",
            arg=n,
            timeout=WAIT_MS,
        )
        return FOOTER.search(self.footers()[n - 1])

    def answer_text(self) -> str:
        """The last plain assistant message (not reasoning, not timings)."""
        bots = [m for m in self.messages() if m["role"] == "bot" and not m["thought"] and not FOOTER.search(m["text"])]
        return _label_text(bots[-1]["label"]) if bots else ""

    def error(self) -> str:
        e = self.page.locator("#error")
        return e.get_by_test_id("markdown").inner_text().strip() if e.is_visible() else ""


def _label_text(label: str) -> str:
    return label.split("message: ", 1)[1] if "message: " in label else label


def squash(text: str) -> str:
    """Text with whitespace runs as one space: the chat's aria-label turns tabs into spaces."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- tests


def test_chat_about_a_picture_and_a_video_then_think(open_tab, api, media):
    """Upload a picture and a video, ask, get the API's answer and timings; ask a follow-up with
    thinking on: the KV cache is reused as chat() reuses it and the reasoning folds away."""
    t0 = time.monotonic()
    tab = open_tab()
    tab.attach(media["pic.png"], media["clip.mp4"])
    q1 = "What is in the picture and the video?"
    tab.ask(q1)
    f1 = tab.wait_footers(1)

    user = [m for m in tab.messages() if m["role"] == "user"]
    assert user[0]["images"] == 1  # the picture's thumbnail
    assert "clip.mp4: 15 frames in 5 groups of up to 3" in user[-1]["text"]  # --packing 3, as the CLI
    assert q1 in user[-1]["text"]

    msgs = [{"role": "user", "content": [load_image(media["pic.png"]), load_video(media["clip.mp4"], packing=3), q1]}]
    a1 = api.chat(msgs, greedy=True, max_new_tokens=PAGE_MAX_TOKENS)
    assert squash(tab.answer_text()) == squash(a1)
    assert int(f1["slices"]) == len(a1.stats.vision_ms) == 6  # 1 image slot + 5 video groups
    # (what the cache held before depends on earlier tabs: compare the prompt, not the prefill)
    assert int(f1["prompt"]) == a1.stats.prompt_tokens and int(f1["decode"]) == a1.stats.decode_tokens
    assert f1["end"] == a1.stats.finish_reason

    # follow-up with thinking: only the new tokens are prefilled, no vision, as chat() does
    tab.page.locator("#think input").check()
    q2 = "Why?"
    tab.ask(q2)
    f2 = tab.wait_footers(2)
    msgs += [{"role": "assistant", "content": str(a1)}, {"role": "user", "content": [q2]}]
    a2 = api.chat(msgs, greedy=True, max_new_tokens=PAGE_MAX_TOKENS, enable_thinking=True)
    assert f2["slices"] is None and int(f2["prompt"]) == a2.stats.prompt_tokens
    assert int(f2["prefill"]) == a2.stats.tokens_prefilled < a2.stats.prompt_tokens
    assert int(f2["decode"]) == a2.stats.decode_tokens
    assert a2.thinking
    thought = [m for m in tab.messages() if m["thought"]]
    assert len(thought) == 1 and squash(_label_text(thought[0]["label"])) == squash(a2.thinking)
    group = tab.page.locator("#chat .thought-group")
    # open while it streams, folded once done (after a short animation): only the title shows
    tab.page.wait_for_function("() => document.querySelector('#chat .thought-group').innerText.trim() == 'Thinking'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    box = tab.page.locator("#sampling").bounding_box()  # the chat, its box and controls
    tab.page.screenshot(
        path=str(ARTIFACTS / "web-chat.png"),
        clip={"x": 0, "y": 0, "width": 960, "height": box["y"] + box["height"] + 16},
    )
    group.locator(".title").click()
    words = a2.thinking.split()[:2]
    tab.page.wait_for_function(
        "w => document.querySelector('#chat .thought-group').innerText.includes(w)", arg=words[0]
    )
    assert tab.error() == ""
    print(f"chat test: {time.monotonic() - t0:.1f} s in the browser; screenshot {ARTIFACTS / 'web-chat.png'}")


def test_stop_ends_the_answer_at_once_and_the_chat_goes_on(open_long_tab, long_api):
    tab = open_long_tab()
    tab.setting("max-tokens", str(LONG))
    tab.ask("Tell me a long story.")
    # the answer streams: it is seen growing before it ends
    seen = set()
    while len(seen) < 3:
        assert not tab.footers(), "the answer ended before Stop could be pressed"
        if text := tab.answer_text().strip(" …"):
            seen.add(len(text))
        time.sleep(0.05)
    tab.page.locator("#stop").click()
    f = tab.wait_footers(1)
    assert f["end"] == "stopped"
    # the stream was closed: its decode counters were recorded, and far fewer tokens than asked for
    n = int(f["decode"])
    assert 0 < n < LONG
    shown = tab.answer_text()
    assert len(shown) >= max(seen)
    time.sleep(0.5)
    assert tab.answer_text() == shown  # nothing decoded after Stop
    # the page kept exactly the n streamed tokens (greedy: the API's first n; only the API flushes
    # an incomplete UTF-8 tail, as U+FFFD)
    story = {"role": "user", "content": ["Tell me a long story."]}
    kept = str(long_api.chat([story], greedy=True, max_new_tokens=n)).removesuffix("\ufffd").strip()
    assert squash(shown) == squash(kept)

    # the partial answer is part of the conversation; the next question reuses the cache
    tab.setting("max-tokens", str(PAGE_MAX_TOKENS))
    tab.ask("Go on.")
    f2 = tab.wait_footers(2)
    msgs = [story, {"role": "assistant", "content": kept}, {"role": "user", "content": ["Go on."]}]
    assert int(f2["prompt"]) == len(long_api.prompt_token_ids(long_api.build_prompt(msgs)))
    assert int(f2["prefill"]) < int(f2["prompt"]) and f2["end"] != "stopped"
    assert tab.error() == ""


def test_a_second_tab_waits_for_the_first(open_long_tab):
    first, second = open_long_tab(), open_long_tab()
    first.setting("max-tokens", str(LONG))
    first.ask("Tell me a long story.")
    first.page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length > 0")
    while not first.answer_text().strip(" …"):
        time.sleep(0.05)
    second.ask("Hello")
    try:
        second.page.get_by_text("waiting: another tab's answer is being generated").wait_for()
    except Exception as e:  # say what the two tabs showed instead
        raise AssertionError(
            f"no waiting line in the second tab ({type(e).__name__}); it shows "
            f"{second.messages()}; the first tab's answer has {len(first.answer_text())} "
            f"characters, footers {first.footers()}"
        ) from None
    assert not second.footers()
    first.page.locator("#stop").click()
    assert first.wait_footers(1)["end"] == "stopped"
    assert second.wait_footers(1)["end"] in ("stop", "length")
    assert second.answer_text()


def test_bad_uploads_show_one_line_and_keep_the_conversation(open_tab, media):
    tab = open_tab()
    tab.ask("Hello")
    tab.wait_footers(1)
    before = tab.messages()

    for bad, says in (("bad.jpg", "bad.jpg: not an image in a supported format"), ("broken.mp4", "broken.mp4: ")):
        tab.attach(media[bad])
        tab.ask("What is this?")
        tab.page.locator("#error").get_by_text(says).wait_for()
        err = tab.error()
        assert err.startswith(says) and "\n" not in err and "/tmp" not in err, err
        assert tab.messages() == before  # the conversation is unchanged
        assert tab.page.locator("#msg textarea").input_value() == "What is this?"  # kept to retry
        tab.remove_files()

    # still usable: a good picture is answered and the error goes away
    tab.attach(media["pic.png"])
    tab.ask("And this?")
    tab.wait_footers(2)
    assert tab.error() == ""


def test_regenerate_and_clear(open_tab, api):
    tab = open_tab()
    tab.ask("Name a colour.")
    tab.wait_footers(1)
    first = tab.answer_text()
    assert squash(first) == squash(
        api.chat([{"role": "user", "content": ["Name a colour."]}], greedy=True, max_new_tokens=PAGE_MAX_TOKENS)
    )
    tab.setting("seed", "7")
    tab.page.locator("#greedy input").uncheck()
    tab.page.locator("#regenerate").click()
    tab.page.wait_for_function(
        "() => ![...document.querySelectorAll('#chat [data-testid=bot] small')]"
        ".some(e => e.innerText.includes('tok/s'))"
    )
    tab.wait_footers(1)
    assert len([m for m in tab.messages() if m["role"] == "user"]) == 1  # the same question, answered anew
    again = api.chat([{"role": "user", "content": ["Name a colour."]}], seed=7, max_new_tokens=PAGE_MAX_TOKENS)
    assert squash(tab.answer_text()) == squash(again) != squash(first)
    tab.page.locator("#clear").click()
    tab.page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=user]').length == 0")
    tab.ask("Hello again")
    assert tab.wait_footers(1)["end"] in ("stop", "length")
