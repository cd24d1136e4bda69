"""§4c's llama.cpp video figure: llama-server (built once by bench/llama_server.py, as §4d's peer) answering
the same 60 s clip as a `video_url` data URI through its OpenAI endpoint.

The pinned llama.cpp (llama-cpp-python 0.3.36's vendor tree) takes `input_video` / `video_url` parts
(tools/server/server-common.cpp), sampled at the server's `--video-fps` (default 4) by mtmd's video helper,
which runs `ffmpeg` and `ffprobe` executables (PATH, or `--video-ffmpeg-dir`); its MiniCPM-V encoder has
no temporal input, so every sampled frame is an image of its own. To set beside ours' measured request
(max_frames spreads 6 frames over the whole minute), it samples at 6 frames / clip length; the whole
clip at fps 5, as ours counts it, is estimated from that request.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from ..common import Skip
from ..session import Session

CTX = 8192


def binary(bench: Session) -> tuple[Path | None, str | None]:
    """(llama-server, None), or (None, why not)."""
    missing = [t for t in ("ffmpeg", "ffprobe") if shutil.which(t) is None]
    if missing:
        return None, (
            f"{' and '.join(missing)} not found on PATH: llama-server's video input runs them to decode and "
            "sample frames (e.g. `apt install ffmpeg` on Debian)"
        )
    try:
        return bench.llama_server()[0], None
    except Skip as e:
        return None, str(e)


def measure(a: dict) -> dict:
    """One request: the clip sampled to about a["frames"] frames over its whole length, max_tokens 4."""
    import av

    from .serve import VIDEO_QUESTION, Server, ask, free_port

    with av.open(a["video"]) as c:
        seconds = c.duration / av.time_base
    fps = a["frames"] / seconds
    port = free_port()
    cmd = [
        a["binary"],
        "-m",
        a["lm"],
        "--mmproj",
        a["mmproj"],
        "-np",
        "1",
        "-c",
        str(CTX),
        "-t",
        str(a["threads"]),
        "--video-fps",
        f"{fps:.6g}",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--no-webui",
    ]
    srv = Server("llama-server", cmd, port, "/health")
    try:
        ready = srv.wait_ready(600)
        uri = "data:video/mp4;base64," + base64.b64encode(Path(a["video"]).read_bytes()).decode()
        msgs = [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": VIDEO_QUESTION}],
            }
        ]
        ask(srv, [{"role": "user", "content": "Hello"}], 2)  # warm-up
        reply = ask(srv, msgs, 4)
        return {"fps": fps, "seconds": seconds, "frames": a["frames"], "ready_s": ready, "reply": vars(reply)}
    finally:
        srv.stop()


def whole_clip(r: dict, whole_frames: int) -> tuple[float | None, float | None]:
    """llama-server's prompt tokens and time to first token for `whole_frames` frames, scaled by frames from
    the measured request (the question's few tokens scaled too; attention's growth with the context not)."""
    n = (r["reply"].get("usage") or {}).get("prompt_tokens")
    if not n:
        return None, None
    k = whole_frames / r["frames"]
    return n * k, r["reply"]["ttft_s"] * k
