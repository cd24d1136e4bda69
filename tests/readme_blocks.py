"""The README's examples as data: fenced code blocks, inline code, and shell commands within them.

A block is found by its language tag and a piece of text only it contains (`find`), so that a README
edit which drops or rewrites an example makes the test that runs it fail with the example's name,
not silently run nothing.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

_FENCE = re.compile(r"^```(.*)$")
_INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")


@dataclass(frozen=True)
class Block:
    lang: str  # the fence's info string, e.g. "sh", "python", "json lines"
    text: str  # the lines between the fences, each ending with a newline
    line: int  # 1-based line number of the opening fence, for messages

    def __str__(self) -> str:
        return f"README.md:{self.line} ```{self.lang}"


def fenced_blocks(markdown: str) -> list[Block]:
    """Every ``` block, in order; an unclosed fence is an error (it would swallow the rest)."""
    blocks, open_at, lang, body = [], None, "", []
    for n, line in enumerate(markdown.splitlines(keepends=True), 1):
        m = _FENCE.match(line.rstrip("\n"))
        if open_at is None and m:
            open_at, lang, body = n, m.group(1).strip(), []
        elif open_at is not None and line.strip() == "```":
            blocks.append(Block(lang, "".join(body), open_at))
            open_at = None
        elif open_at is not None:
            body.append(line)
    if open_at is not None:
        raise ValueError(f"README.md:{open_at}: a ``` block is never closed")
    return blocks


def prose(markdown: str) -> str:
    """The text outside the fenced blocks."""
    out, inside = [], False
    for line in markdown.splitlines(keepends=True):
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "".join(out)


def inline_code(markdown: str) -> list[str]:
    """Inline `code` spans of the prose, whitespace (including a line break inside a span) made one space."""
    return [" ".join(m.group(1).split()) for m in _INLINE.finditer(prose(markdown))]


def find(blocks: list[Block], name: str, lang: str, marker: str) -> Block:
    """The one block tagged `lang` that contains `marker`; fails naming the example otherwise."""
    hits = [b for b in blocks if b.lang == lang and marker in b.text]
    assert len(hits) == 1, (
        f"README example {name!r}: expected one ```{lang} block containing {marker!r}, "
        f"found {len(hits)} ({', '.join(map(str, hits)) or 'it was removed or changed'})"
    )
    return hits[0]


@dataclass(frozen=True)
class Command:
    text: str  # as written, continuation lines joined (bash runs it unchanged)
    comment: str  # the comment lines just above it, joined with spaces ("" if none)

    @property
    def argv(self) -> list[str]:
        """The words as the shell splits them, a trailing comment dropped."""
        return shlex.split(self.text, comments=True)

    @property
    def alternative(self) -> bool:
        """Introduced by "# or ..." / "# ... or ...": instead of the command before it, not after it."""
        return re.match(r"#\s*(\.\.\.\s*)?or\b", self.comment) is not None


def shell_commands(text: str) -> list[Command]:
    """The commands of a shell block: backslash continuations joined, comment lines attached to the
    command that follows them. Blocks with here-documents are run whole, never split."""
    assert "<<" not in text, "a block with a here-document is not split into commands"
    commands, comment, pending = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not pending and not stripped:
            comment = []
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(Command(pending + line.strip(), " ".join(comment)))
        pending, comment = "", []
    assert not pending, f"the block ends inside a continued line: {pending!r}"
    return commands
