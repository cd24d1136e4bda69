"""What a front end lets its user set, as data, with the defaults of `MiniCPMV.chat` and
`minicpm-run`: how an answer is made (ChatOptions), how a video is sampled (MediaOptions), and where
the model comes from and how it runs (ModelOptions). The CLI's flags, the web page's settings and
the API's request fields fill these; `ChatOptions.chat_kwargs()` is what reaches `chat()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minicpmv.runtime.video import DEFAULT_FPS, MAX_NUM_FRAMES
from minicpmv.schema import MAX_SLICE_NUMS, VIDEO_MAX_SLICE_NUMS
from minicpmv.schema import REFERENCE_SAMPLING as S
from minicpmv.schema import THINKING_SAMPLING as TS

DEFAULT_MAX_TOKENS = 2048  # the reference chat()'s max_new_tokens

# One help text per option, for the CLI's --help, the page's labels and docs/serving.md.
HELP = {
    "think": "Thinking mode: the model reasons before answering.",
    "max_tokens": f"Most tokens to generate (default {DEFAULT_MAX_TOKENS}).",
    "temperature": f"Sampling temperature (default {S.temperature}).",
    "top_p": f"Nucleus sampling (default {S.top_p}; {TS.top_p} with thinking).",
    "top_k": f"Top-k sampling, 0 = off (default {S.top_k}; {TS.top_k} with thinking).",
    "repeat_penalty": f"Repetition penalty (default {S.repetition_penalty}; {TS.repetition_penalty} with thinking).",
    "greedy": "Always take the most likely token (deterministic).",
    "seed": "Random seed for sampling (default: random).",
    "system": "System prompt.",
    "max_slices": f"Most slices per image (default {MAX_SLICE_NUMS}; {VIDEO_MAX_SLICE_NUMS} for videos).",
    "image_id": "Number images in the prompt (default: on for images, off for videos).",
    "fps": "Video: frames sampled per second.",
    "max_frames": "Video: most groups (64-token units) per video.",
}


@dataclass
class ChatOptions:
    """How one answer is made. None: the reference's default (which differs with thinking on)."""

    think: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    greedy: bool = False
    seed: int | None = None
    system: str = ""
    max_slices: int | None = None
    image_id: bool | None = None
    stop: list[str] = field(default_factory=list)  # the answer ends before any of these

    def chat_kwargs(self) -> dict:
        """`MiniCPMV.chat` arguments (slices and image ids default per conversation there)."""
        return dict(
            enable_thinking=self.think,
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repeat_penalty,
            seed=self.seed,
            greedy=self.greedy,
            system_prompt=self.system,
            max_slice_nums=self.max_slices,
            use_image_id=self.image_id,
            stop=list(self.stop),
        )


@dataclass
class MediaOptions:
    """How videos are sampled (runtime.video.load_video): the model card's defaults."""

    fps: float = float(DEFAULT_FPS)
    packing: int | None = None  # None: the card's automatic packing (at most 3)
    max_frames: int = MAX_NUM_FRAMES


@dataclass
class ModelOptions:
    """Which model files and how they run (MiniCPMV.load's arguments). Model source precedence:
    model/mmproj or model_dir > hf > $MINICPMV_MODEL > the default Hub repo (minicpmv.hub.source)."""

    model: Path | None = None
    mmproj: Path | None = None
    model_dir: Path | None = None
    hf: str | None = None
    mmproj_quant: str | None = None
    refresh: bool = False
    threads: int | None = None
    ctx: int | None = None
    low_memory: bool = False
    kv_type: str | None = None
    flash_attn: bool | None = None
    gpu_layers: int | None = None
    vision_dtype: str = "auto"
    llama_log: bool = False
