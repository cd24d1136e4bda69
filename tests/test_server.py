"""`minicpm-serve` (issue 27) through the official clients: the `openai` and `ollama` Python packages
against a server in a subprocess on the tiny model, never a client of our own. The oracle is
`MiniCPMV.chat` in this process on the same files and messages, greedy: both use a float32 KV cache
without flash attention, so answers match token for token whatever was cached or batched.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from PIL import Image

from minicpmv.runtime import Video, next_turn
from minicpmv.runtime.results import Piece
from minicpmv.server.ollama_api import PieceLines, chat_piece, generate_piece
from minicpmv.server.openai_api import ChatRequest, ChunkWriter
from minicpmv.session.options import ChatOptions

from .helpers import load_exact, one_error_line, run_cli
from .processes import health, serve_process
from .test_runtime_chat import picture
from .video_fixtures import make_video

EXACT = ["--kv-type", "f32", "--no-flash-attn", "--vision-dtype", "f32", "-t", "1"]
N = 12  # tokens per answer


def png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("server-media")
    return {
        "pic": picture(448, 448, seed=21),
        "pic2": picture(672, 448, seed=22),
        "pic3": picture(448, 672, seed=23),
        "clip": make_video(d / "clip.mp4", 12, 6, size=(64, 48)).read_bytes(),
    }


@pytest.fixture(scope="module")
def model(files):
    m = load_exact(*files)
    yield m
    m.close()


@pytest.fixture(scope="module", params=["1", "3"], ids=["one-at-a-time", "3-slots"])
def server(files, tmp_path_factory, request):
    """The same server answering one request at a time (--parallel 1, the context growing) and with
    three slots decoded together (issue 30): every test below holds for both."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        "--parallel",
        request.param,
        "--model",
        files[0],
        "--mmproj",
        files[1],
        *EXACT,
        "--ctx",
        "4096",
        "--max-upload-mb",
        "2",
        "--max-body-mb",
        "4",
        "--max-image-pixels",
        "1000000",
        "--alias",
        "minicpm-v",
    ]
    with serve_process(args, log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0, timeout=120)


def ref(model, msgs, **kw):
    model.reset()
    return model.chat(msgs, greedy=True, max_new_tokens=N, **kw)


def ask(client, content, **kw):
    return client.chat.completions.create(
        model="minicpm-v", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=N, **kw
    )


# --------------------------------------------------------------------------- OpenAI API


def test_health_and_models(server, client):
    assert health(server) == (200, {"status": "ok"})
    assert [m.id for m in client.models.list()] == ["minicpm-v"]


def test_text_and_image_answers_match_chat(client, model, media):
    got = ask(client, "Count to five.")
    want = ref(model, [{"role": "user", "content": "Count to five."}])
    assert got.choices[0].message.content == str(want) and got.choices[0].finish_reason in ("stop", "length")
    assert (
        got.usage.prompt_tokens == want.stats.prompt_tokens and got.usage.completion_tokens == want.stats.decode_tokens
    )
    assert getattr(got.choices[0].message, "reasoning_content", None) is None  # thinking off: no such field

    parts = [
        {"type": "image_url", "image_url": {"url": data_uri(png(media["pic"]), "image/png")}},
        {"type": "image_url", "image_url": {"url": data_uri(png(media["pic2"]), "image/png")}},
        {"type": "text", "text": "Compare the two pictures."},
    ]
    got = ask(client, parts)
    want = ref(model, [{"role": "user", "content": [media["pic"], media["pic2"], "Compare the two pictures."]}])
    assert got.choices[0].message.content == str(want)
    assert got.model_extra["timings"]["vision_ms"] > 0 and want.stats.slots_prefilled > 2


def test_streaming_and_thinking(client, model, media):
    parts = [
        {"type": "image_url", "image_url": {"url": data_uri(png(media["pic"]), "image/png")}},
        {"type": "text", "text": "What is in the image?"},
    ]
    want = ref(model, [{"role": "user", "content": [media["pic"], "What is in the image?"]}], enable_thinking=True)
    got = ask(client, parts, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = got.choices[0].message
    assert msg.content == str(want) and msg.reasoning_content == want.thinking and want.thinking

    chunks = list(
        ask(
            client,
            parts,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning.strip() == want.thinking and content.strip() == str(want)
    assert chunks[-1].usage.completion_tokens == want.stats.decode_tokens and chunks[-1].choices == []
    assert deltas[0].role == "assistant" and chunks[-2].choices[0].finish_reason in ("stop", "length")

    plain = list(ask(client, "Hello", stream=True))
    assert all(getattr(c.choices[0].delta, "reasoning_content", None) is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain).strip() == str(
        ref(model, [{"role": "user", "content": "Hello"}])
    )


def test_video_parts_match_chat(client, model, media):
    uri = data_uri(media["clip"], "video/mp4")
    want = ref(model, [{"role": "user", "content": [Video(media["clip"], packing=2), "Describe the video."]}])
    for part in (
        {"type": "video_url", "video_url": {"url": uri}},
        {"type": "input_video", "input_video": {"data": base64.b64encode(media["clip"]).decode(), "format": "mp4"}},
    ):
        got = ask(
            client,
            [part, {"type": "text", "text": "Describe the video."}],
            extra_body={"mm_processor_kwargs": {"packing": 2}},
        )
        assert got.choices[0].message.content == str(want)
        assert got.usage.prompt_tokens == want.stats.prompt_tokens


def test_a_follow_up_on_the_same_photo_decodes_only_its_new_tokens(client, model, media):
    pic = {"type": "image_url", "image_url": {"url": data_uri(png(media["pic3"]), "image/png")}}
    question = {"type": "text", "text": "What is in the image?"}
    first = client.chat.completions.create(
        model="m", temperature=0, max_tokens=N, messages=[{"role": "user", "content": [pic, question]}]
    )
    t1 = first.model_extra["timings"]
    answer = first.choices[0].message.content
    # while the user reads, the server decodes the answer as the follow-up will resend it: the
    # template renders a past answer without the empty think block its generation prompt opened
    # (runtime/next_turn.py); the tiny model needs milliseconds for it
    time.sleep(3)
    follow = [
        {"role": "user", "content": [pic, question]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the colours?"},
    ]
    second = client.chat.completions.create(model="m", temperature=0, max_tokens=N, messages=follow)
    t2 = second.model_extra["timings"]
    assert t1["vision_ms"] > 0 and t2["vision_ms"] == 0  # not encoded again
    msgs = [{"role": "user", "content": [media["pic3"], "What is in the image?"]}]
    prefix = next_turn.history_prefix(model, msgs, answer, {})
    assert t2["cache_n"] == len(prefix) > first.usage.prompt_tokens
    # decoded: only the new question and the template around it
    new = model.prompt_runs(model.build_prompt([*msgs, follow[1], follow[2]]))[0]
    assert t2["prompt_n"] == second.usage.prompt_tokens - len(prefix) == len(new) - len(prefix)
    model.reset()
    want = model.chat([*msgs, follow[1], follow[2]], greedy=True, max_new_tokens=N)
    assert second.choices[0].message.content == str(want)


# --------------------------------------------------------------------------- Ollama API


def test_ollama_client_chat_and_generate(server, model, media):
    c = ollama.Client(host=server.rstrip("/"))
    assert [m.model for m in c.list().models] == ["minicpm-v"]
    assert "vision" in c.show("minicpm-v").capabilities
    options = {"temperature": 0, "num_predict": N}
    got = c.chat(
        model="minicpm-v",
        options=options,
        messages=[{"role": "user", "content": "What is in the image?", "images": [png(media["pic"])]}],
    )
    want = ref(model, [{"role": "user", "content": [media["pic"], "What is in the image?"]}])
    assert got.message.content == str(want) and got.message.thinking is None and got.done
    assert got.eval_count == want.stats.decode_tokens and got.prompt_eval_count == want.stats.prompt_tokens

    want = ref(model, [{"role": "user", "content": [media["pic"], "What is in the image?"]}], enable_thinking=True)
    parts = list(
        c.chat(
            model="minicpm-v",
            options=options,
            think=True,
            stream=True,
            messages=[{"role": "user", "content": "What is in the image?", "images": [png(media["pic"])]}],
        )
    )
    assert "".join(p.message.thinking or "" for p in parts).strip() == want.thinking
    assert "".join(p.message.content for p in parts).strip() == str(want) and parts[-1].done

    gen = c.generate(model="minicpm-v", prompt="What is in the image?", images=[png(media["pic"])], options=options)
    assert gen.response == str(ref(model, [{"role": "user", "content": [media["pic"], "What is in the image?"]}]))


# --------------------------------------------------------------------------- errors


def raw(server, body, path="v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else None
    return httpx.post(server + path, content=content, json=None if content is not None else body, timeout=60, **kw)


def error_of(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    msg = msg["message"] if isinstance(msg, dict) else msg
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_bad_requests_are_4xx_with_one_line_and_the_server_keeps_serving(server, client, media):
    big = png(Image.new("RGB", (1100, 1000), (9, 9, 9)))
    text = {"role": "user", "content": "hi"}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]},
            400,
            "'audio' is not supported",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_uri(png(media["pic"])[:3000], "image/png")}}
                        ],
                    }
                ]
            },
            400,
            "cannot decode image",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": data_uri(big, "image/png")}}],
                    }
                ]
            },
            400,
            "limit of 1 MP",
            "--max-image-pixels",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}],
                    }
                ]
            },
            400,
            "does not fetch media from URLs",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}
                ]
            },
            400,
            "file:// URLs are refused",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": data_uri(b"RIFF....WAVEfmt ", "video/mp4")}}
                        ],
                    }
                ]
            },
            400,
            "not a video in a supported container",
        ),
        ({"messages": [text], "n": 2}, 400, "n: only one choice"),
        ({"messages": [text], "logprobs": True}, 400, "logprobs is not supported"),
        ({"messages": [text], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"messages": [text], "max_tokens": 100_000}, 400, "limit of 8192", "--max-new-tokens"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "n_ctx=4096"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_uri(b"x" * (5 << 19), "image/png")}}
                        ],
                    }
                ]
            },
            413,
            "limit of 2 MB",
            "--max-upload-mb",
        ),
        (b"{" + b" " * (5 << 20) + b"}", 413, "limit of 4 MB", "--max-body-mb"),
    ]
    for body, status, *needles in cases:
        error_of(raw(server, body, headers={"Content-Type": "application/json"}), status, *needles)
        assert ask(client, "Hello").choices[0].message.content is not None  # still serving
    r = raw(server, {"messages": [text], "n": 3})
    assert r.json()["error"]["param"] == "n" and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):  # the official client raises on the error shape
        client.chat.completions.create(model="m", messages=[text], n=2)
    r = raw(
        server, {"model": "x", "messages": [{"role": "user", "content": "q", "images": ["not base64!"]}]}, "api/chat"
    )
    assert r.status_code == 400 and r.json() == {"error": "messages[0].images[0]: not valid base64 data"}


def test_local_files_only_under_the_allowed_folder(files, tmp_path, media):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "pic.png").write_bytes(png(media["pic"]))
    (tmp_path / "secret.png").write_bytes(png(media["pic2"]))
    args = ["--model", files[0], "--mmproj", files[1], *EXACT, "--allowed-local-media", allowed]
    with serve_process(args, tmp_path / "serve.log") as url:
        c = openai.OpenAI(base_url=url + "v1", api_key="x", max_retries=0)
        ok = ask(
            c,
            [
                {"type": "image_url", "image_url": {"url": (allowed / "pic.png").as_uri()}},
                {"type": "text", "text": "What?"},
            ],
        )
        assert ok.model_extra["timings"]["vision_ms"] > 0
        for path in (tmp_path / "secret.png", allowed / ".." / "secret.png"):
            r = raw(
                url,
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "file://" + str(path)}}],
                        }
                    ]
                },
            )
            error_of(r, 403, "outside the folder allowed by --allowed-local-media")


def test_a_body_without_a_length_is_cut_at_the_limit(server, client):
    """A chunked body (no Content-Length) is counted as it arrives and refused past --max-body-mb."""

    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(6):
            yield b"x" * (1 << 20)
        yield b'"}]}'

    r = httpx.post(server + "v1/chat/completions", content=body(), timeout=60)
    assert "content-length" not in r.request.headers
    error_of(r, 413, "limit of 4 MB", "--max-body-mb")
    assert ask(client, "Hello").choices[0].message.content is not None


def test_api_key_and_exposure(files, tmp_path):
    with serve_process(
        ["--model", files[0], "--mmproj", files[1], "-t", "1", "--api-key", "s3cret"], tmp_path / "serve.log"
    ) as url:
        assert health(url)[0] == 200  # open without the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "v1", api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url + "v1", api_key="s3cret").models.list()]
        r = httpx.get(url + "api/tags")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.get(url + "api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = httpx.get(url + "v1/models", headers={"Host": "attacker.example", "Authorization": "Bearer s3cret"})
        assert r.status_code == 403  # a loopback server answers only loopback names (DNS rebinding)
    res = run_cli("minicpm-serve", "--model", files[0], "--mmproj", files[1], "--host", "0.0.0.0")
    one_error_line(res, "--host 0.0.0.0 makes this reachable from other machines", "--api-key", prog="minicpm-serve")


# --------------------------------------------------------------------------- several callers


def test_concurrent_mixed_requests_answer_as_one_by_one(client, media):
    pic = {"type": "image_url", "image_url": {"url": data_uri(png(media["pic"]), "image/png")}}
    requests = [
        ("Count to three.", False),
        ([pic, {"type": "text", "text": "What is it?"}], True),
        ("Name a colour.", True),
        ([pic, {"type": "text", "text": "Is it dark?"}], False),
        ("Say hello.", False),
    ]

    def one(req):
        content, stream = req
        if not stream:
            return ask(client, content).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in ask(client, content, stream=True)).strip()

    alone = [one(r) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, requests * 4))
    assert got == alone * 4


@pytest.fixture(scope="module")
def long_server(tiny_real_vocab_gguf, tmp_path_factory):
    """The real-vocabulary tiny model (long answers) with room for one waiting request."""
    lm, mm = tiny_real_vocab_gguf
    log = tmp_path_factory.mktemp("serve-long") / "serve.log"
    args = ["--model", lm, "--mmproj", mm, "-t", "1", "--max-queue", "1", "--ctx", "8192", "--parallel", "1"]
    with serve_process(args, log) as url:
        yield url


def test_a_dropped_stream_frees_the_model_within_a_second(long_server):
    c = openai.OpenAI(base_url=long_server + "v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=6000, stream=True
    )
    for _, _chunk in zip(range(5), stream):
        pass
    stream.close()  # the client goes away mid-answer
    t0 = time.perf_counter()
    short = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert short.choices[0].message.content is not None
    assert time.perf_counter() - t0 < 1.5  # the 6000-token answer would take several seconds


def test_a_full_queue_answers_503_with_retry_after(long_server):
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3000}
    statuses, retry = [], []

    def post():
        r = httpx.post(long_server + "v1/chat/completions", json=body, timeout=120)
        statuses.append(r.status_code)
        if r.status_code == 503:
            retry.append(r.headers.get("retry-after"))
            error_of(r, 503, "busy", "--max-queue")

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert statuses.count(200) >= 2 and 503 in statuses and all(retry)


def test_stream_content_starts_as_message_content_does():
    """The answer's first token may carry a space (" sit"); message.content (Answer) is stripped, and
    next_turn warms the answer that way, so the joined stream deltas must equal it: a client resends
    them, and a leading space made every follow-up decode the whole answer again (full-size model:
    cache_n 680 instead of 722). The tiny model never starts with a space, so this is checked here."""
    w = ChunkWriter(ChatRequest([], ChatOptions(), stream=True), "m")
    events = [w.piece(Piece(t, False)) for t in (" ", " sit", " Text", "\n")]
    deltas = [json.loads(e.removeprefix("data: ").strip())["choices"][0]["delta"]["content"] for e in events if e]
    assert "".join(deltas) == "sit Text\n"


@pytest.mark.parametrize("piece_json", [chat_piece, generate_piece])
def test_ollama_stream_content_starts_as_message_content_does(piece_json):
    """The Ollama stream, as the OpenAI one above: reasoning without its tags or leading whitespace,
    then the answer without its leading space, so the joined content equals the final message's."""
    w = PieceLines("m", piece_json)
    pieces = [Piece("<think>\n", True), Piece("Hmm", True), Piece("</think>", True), Piece("\n\n", True)]
    pieces += [Piece(t, False) for t in (" ", " sit", " Text", "\n")]
    lines = [json.loads(x) for x in map(w.line, pieces) if x]
    field = "message" if piece_json is chat_piece else None
    parts = [x[field] if field else x for x in lines]
    assert "".join(p.get("thinking", "") for p in parts).rstrip() == "Hmm"
    assert "".join(p["content" if field else "response"] for p in parts) == "sit Text\n"
