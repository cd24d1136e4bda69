"""The text a streamed answer's pieces carry over either API: the reasoning without the think tags,
and the reasoning and the answer each starting as `Answer.thinking` and `Answer` hold them, without
leading whitespace. A client joins the deltas and resends the answer; the follow-up's warm-up
decoded it stripped (docs/serving.md §1.2), so a leading space would make it miss the cache."""

from __future__ import annotations

from minicpmv.runtime.results import Piece
from minicpmv.schema import THINK_END, THINK_START


class StreamText:
    def __init__(self) -> None:
        self._started = {True: False, False: False}  # by piece.thinking: reasoning, answer

    def text(self, piece: Piece) -> str:
        """What to send of `piece` (reasoning if piece.thinking, else answer); "" when nothing is left."""
        text = str(piece)
        if piece.thinking:
            text = text.replace(THINK_START, "").replace(THINK_END, "")
        if not self._started[piece.thinking]:
            text = text.lstrip()
            self._started[piece.thinking] = bool(text)
        return text
