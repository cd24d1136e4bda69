"""One conversation's messages, in the shape `MiniCPMV.chat` takes, as a front end builds them:
media wait in `pending` until the next question carries them; answers are appended as text."""

from __future__ import annotations

from dataclasses import dataclass, field

from .media import Media


@dataclass
class Conversation:
    msgs: list[dict] = field(default_factory=list)
    pending: list[Media] = field(default_factory=list)  # images/videos for the next question

    def add_media(self, item: Media) -> None:
        self.pending.append(item)

    def ask(self, question: str) -> None:
        """The next user message: the pending media, then the question (a str is always text)."""
        self.msgs.append({"role": "user", "content": [*self.pending, *([question] if question else [])]})
        self.pending = []

    def answered(self, answer: str) -> None:
        self.msgs.append({"role": "assistant", "content": str(answer)})

    def retract(self) -> None:
        """Drop the last message (a question that failed, or an answer to regenerate)."""
        if self.msgs:
            self.msgs.pop()

    def reset(self) -> None:
        self.msgs, self.pending = [], []
