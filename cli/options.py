"""The command-line options that `minicpm-run`, its `--web` page and `minicpm-serve` share, declared
once: each is a typed annotation (typer.Option) whose default and help come from the session
layer's data (session/options.py, session/limits.py). A command lists the ones it takes and turns
them into ModelOptions / ChatOptions / MediaOptions / Limits with `pick`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from minicpmv.hub import DEFAULT_MODEL, ENV_VAR
from minicpmv.runtime.video import MAX_NUM_PACKING, PACKING_LIMIT
from minicpmv.session.limits import FLAGS, Limits
from minicpmv.session.options import HELP, ChatOptions, MediaOptions

T = TypeVar("T")

L = Limits()
C = ChatOptions()
M = MediaOptions()

# -- where the model comes from and how it runs (ModelOptions) ---------------------------------

Model = Annotated[Optional[Path], typer.Option("--model", "-m", help="Language-model GGUF file.")]
Mmproj = Annotated[Optional[Path], typer.Option("--mmproj", help="Vision projector (mmproj) GGUF file.")]
ModelDir = Annotated[
    Optional[Path],
    typer.Option("--model-dir", "-d", help="Folder holding both GGUF files (told apart by their metadata)."),
]
Hf = Annotated[
    Optional[str],
    typer.Option(
        "--hf",
        metavar="REPO[:QUANT]",
        help="Hugging Face repo with GGUF files, e.g. openbmb/MiniCPM-V-4_5-gguf:Q8_0: the language model of QUANT "
        "(default Q4_K_M) and the mmproj are downloaded once into the Hub cache. Without any model option: "
        f"${ENV_VAR} (a folder or REPO[:QUANT]), else {DEFAULT_MODEL}.",
    ),
]
MmprojQuant = Annotated[
    Optional[str],
    typer.Option(
        "--mmproj-quant",
        metavar="TYPE",
        help="Which mmproj of a Hub repo with several (default: the only one, else f16).",
    ),
]
Refresh = Annotated[
    bool,
    typer.Option(
        "--refresh",
        help="Ask the Hub for newer files even when the model is cached (cached files are otherwise "
        "used without any network request).",
    ),
]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: all cores).")]
Ctx = Annotated[
    Optional[int],
    typer.Option(
        "--ctx",
        "-c",
        min=256,
        help="Fix the context length in tokens (at most the model's trained 40,960). Default: sized for each turn "
        "(prompt + --max-tokens, rounded up to 512) and grown as the conversation needs, up to the trained "
        "context.",
    ),
]
LowMemory = Annotated[
    bool,
    typer.Option(
        "--low-memory",
        help="For 8 GB machines: KV cache in q8_0 and the vision weights read from the mmproj for each "
        "image instead of kept in memory (about 1.4 GB less; slower vision, slightly different "
        "numbers: see README, Memory).",
    ),
]
KvType = Annotated[
    Optional[str],
    typer.Option(
        "--kv-type",
        help="KV cache precision: f16 (default), q8_0 (half the memory; --low-memory's), f32 (exactly "
        "reproducible logits).",
    ),
]
FlashAttn = Annotated[
    Optional[bool],
    typer.Option(
        "--flash-attn/--no-flash-attn",
        help="llama.cpp's flash attention (default: llama.cpp decides, on for the CPU; q8_0 KV cache needs it).",
    ),
]
GpuLayers = Annotated[
    Optional[int],
    typer.Option("--gpu-layers", help="Layers on the GPU (-1 all; default: all on macOS, none elsewhere)."),
]
VisionDtype = Annotated[
    str,
    typer.Option(
        "--vision-dtype",
        help="Vision encoder precision: auto (bf16 where a quick measurement on this machine finds it "
        "at least 15% faster than f32, measured once and cached), bf16, f32.",
    ),
]
LlamaLog = Annotated[bool, typer.Option("--llama-log", help="Show llama.cpp's own log (silent by default).")]


# -- how an answer is made (ChatOptions) and videos sampled (MediaOptions) ----------------------

Think = Annotated[bool, typer.Option("--think/--no-think", help=HELP["think"])]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help=HELP["max_tokens"])]
Temperature = Annotated[Optional[float], typer.Option("--temperature", "--temp", min=0.0, help=HELP["temperature"])]
TopP = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help=HELP["top_p"])]
TopK = Annotated[Optional[int], typer.Option("--top-k", min=0, help=HELP["top_k"])]
RepeatPenalty = Annotated[Optional[float], typer.Option("--repeat-penalty", min=0.0, help=HELP["repeat_penalty"])]
Greedy = Annotated[bool, typer.Option("--greedy", help=HELP["greedy"])]
Seed = Annotated[Optional[int], typer.Option("--seed", help=HELP["seed"])]
System = Annotated[str, typer.Option("--system", help=HELP["system"])]
MaxSlices = Annotated[Optional[int], typer.Option("--max-slices", min=1, help=HELP["max_slices"])]
ImageId = Annotated[Optional[bool], typer.Option("--image-id/--no-image-id", help=HELP["image_id"])]
Fps = Annotated[float, typer.Option("--fps", min=0.01, help=HELP["fps"])]
Packing = Annotated[
    Optional[int],
    typer.Option(
        "--packing",
        min=1,
        max=PACKING_LIMIT,
        help=f"Video: frames per 64-token group (default: automatic, at most {MAX_NUM_PACKING} as the model card). "
        f"Above {MAX_NUM_PACKING} is this project's extension: the card caps packing at {MAX_NUM_PACKING}, this "
        "raises the cap.",
    ),
]
MaxFrames = Annotated[int, typer.Option("--max-frames", min=1, help=HELP["max_frames"])]


# -- what a network front end accepts (Limits) and who may use it -------------------------------

MaxUploadMb = Annotated[
    float,
    typer.Option(
        FLAGS["max_upload_mb"],
        min=0.001,
        help=f"Largest file a user may upload to the page, in MB (default {L.max_upload_mb:g}).",
    ),
]
MaxBodyMb = Annotated[
    float,
    typer.Option(
        FLAGS["max_body_mb"],
        min=0.001,
        help=f"Largest request body, in MB; media come inline as base64, "
        f"4/3 of their size (default {L.max_body_mb:g}).",
    ),
]
MaxImagePixels = Annotated[
    int,
    typer.Option(
        FLAGS["max_image_pixels"],
        min=1,
        help=f"Most pixels of one image, checked before it is decoded (default {L.max_image_pixels:,}).",
    ),
]
MaxVideoSeconds = Annotated[
    float,
    typer.Option(
        FLAGS["max_video_seconds"], min=0.1, help=f"Longest video, in seconds (default {L.max_video_seconds:g})."
    ),
]
MaxVideoFrames = Annotated[
    int,
    typer.Option(
        FLAGS["max_video_frames"], min=1, help=f"Most frames sampled from one video (default {L.max_video_frames})."
    ),
]
MaxVideoPixels = Annotated[
    int,
    typer.Option(
        FLAGS["max_video_pixels"],
        min=1,
        help=f"Most pixels of one video frame (default {L.max_video_pixels:,}, 1080p).",
    ),
]
MaxNewTokens = Annotated[
    int,
    typer.Option(
        FLAGS["max_new_tokens"],
        min=1,
        help=f"Most tokens one answer may ask for; more is refused (default {L.max_new_tokens}).",
    ),
]
MaxQueue = Annotated[
    int,
    typer.Option(
        FLAGS["max_queue"],
        min=1,
        help=f"Most requests waiting for the model; beyond it they are refused as busy (default {L.max_queue}).",
    ),
]
Host = Annotated[
    str,
    typer.Option(
        "--host",
        help="Address to listen on (127.0.0.1: this machine only). Another "
        "address makes it reachable from other machines, which needs a "
        "login or key, or --no-auth.",
    ),
]
NoAuth = Annotated[
    bool,
    typer.Option(
        "--no-auth",
        help="Listen on a non-loopback --host without any login or key "
        "(anyone who can reach the port can use the model).",
    ),
]


def pick(cls: type[T], values: Mapping[str, object]) -> T:
    """A session-layer dataclass (ModelOptions, ChatOptions, MediaOptions, Limits) from a command's
    arguments: the commands name their parameters after its fields; fields a command lacks keep
    their defaults."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
