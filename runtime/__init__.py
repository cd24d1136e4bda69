"""MiniCPM-V 4.5 runtime: llama.cpp language model + torch vision encoder + the reference's prompt."""

from .chat import Answer, ChatStats, ChatStream, MiniCPMV, ModelFileError, Piece
from .llama import ContextOverflowError, LlamaError

__all__ = ["MiniCPMV", "Answer", "ChatStats", "ChatStream", "Piece", "ModelFileError",
           "ContextOverflowError", "LlamaError"]
