"""MiniCPM-V 4.5 runtime: llama.cpp language model + torch vision encoder + the reference's prompt."""

from minicpmv.gguf_info import ModelFileError

from .chat import MiniCPMV
from .llama_backend import ContextOverflowError, LlamaError
from .results import Answer, ChatStats, ChatStream, Piece
from .video import Video, VideoFrames, load_video

__all__ = [
    "MiniCPMV",
    "Answer",
    "ChatStats",
    "ChatStream",
    "Piece",
    "ModelFileError",
    "ContextOverflowError",
    "LlamaError",
    "Video",
    "VideoFrames",
    "load_video",
]
