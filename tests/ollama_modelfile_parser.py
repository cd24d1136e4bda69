"""A Modelfile validator that follows Ollama's parser rules (written for the tests, not shipped).

Rules as documented in docs/ollama.md §3 (ollama/ollama@fb30760 parser/parser.go
`ParseFile`, `unquote`, `isValidCommand`; api/types.go `FormatParams`):
- A rune-level state machine: blank/whitespace -> command name (letters only, case-insensitive)
  -> one space/tab -> value. `#` at the start of a line is a comment up to the newline.
- PARAMETER: name of letters, digits and `_`, then the value. MESSAGE: role (system/user/assistant).
- A value ends at a newline once its whitespace-trimmed text is "complete": unquoted, or
  `"..."`, or `\"\"\"...\"\"\"` (at least 6 characters). So quoted values may span lines, and a quoted
  block ends at the first line ending with its closing quote(s). There are no escapes and no
  single quotes. Non-printable runes outside the whitespace/newline transitions are dropped.
- Unknown command -> error; a file without FROM -> "no FROM line"; a quote never closed -> EOF error.
- Parameters: names and value types from Ollama's Options (int, float32, bool, []string);
  deprecated names are accepted and dropped with a warning; anything else is an unknown parameter.

On top of what Ollama rejects, `lint` flags forms Ollama accepts but that never do what the
author meant: a JSON list on one `stop` line (it becomes ONE literal stop string).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
ROLES = ("system", "user", "assistant")

# docs/ollama.md §3 (ollama/ollama@fb30760 api/types.go Options / Runner)
INT_PARAMS = {
    "num_ctx",
    "num_batch",
    "num_gpu",
    "num_thread",
    "main_gpu",
    "draft_num_predict",
    "num_keep",
    "seed",
    "num_predict",
    "top_k",
    "repeat_last_n",
}
FLOAT_PARAMS = {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"}
BOOL_PARAMS = {"use_mmap"}
LIST_PARAMS = {"stop"}
DEPRECATED_PARAMS = {
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
}

# Go strconv syntax accepted for the typed parameters (decimal forms; Go also takes hex floats)
_GO_INT = re.compile(r"[+-]?[0-9]+\Z")
_GO_FLOAT = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)\Z", re.I)
_GO_BOOL = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
_SEMVER = re.compile(r"v?(0|[1-9]\d*)(\.(0|[1-9]\d*)(\.(0|[1-9]\d*))?)?(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?\Z")


class ModelfileError(ValueError):
    def __init__(self, msg: str, line: int = 0):
        super().__init__(f"(line {line}): {msg}" if line else msg)
        self.line = line


@dataclass
class Command:
    name: str  # "model" for FROM (as Ollama stores it), lower-case command, or the parameter name
    args: str
    line: int


@dataclass
class Modelfile:
    commands: list[Command]
    froms: list[str] = field(default_factory=list)
    template: str | None = None
    system: str | None = None
    params: dict[str, object] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    requires: str | None = None
    warnings: list[str] = field(default_factory=list)


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _is_space(c: str) -> bool:
    return c in " \t"


def _is_newline(c: str) -> bool:
    return c in "\r\n"


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_print(c: str) -> bool:
    """Go strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return c == " " or (c.isprintable() and not c.isspace())


def parse(text: str) -> list[Command]:
    """Commands of a Modelfile, or ModelfileError where Ollama's parser fails."""
    if text.startswith("\ufeff"):
        text = text[1:]
    NIL, NAME, VALUE, PARAM, MESSAGE, COMMENT = range(6)
    state, line, buf, role = NIL, 1, [], ""
    name = ""
    cmds: list[Command] = []
    for c in text:
        if _is_newline(c):
            line += 1
        # next state for this rune
        if state == NIL:
            nxt = COMMENT if c == "#" else NIL if (_is_space(c) or _is_newline(c)) else NAME
            keep = nxt == NAME
        elif state == NAME:
            if _is_alpha(c):
                nxt, keep = NAME, True
            elif _is_space(c):
                nxt, keep = VALUE, False
            else:
                raise ModelfileError(f"command must be one of {', '.join(COMMANDS)}", line)
        elif state == VALUE:
            nxt, keep = (NIL, True) if (_is_newline(c) or _is_space(c)) else (VALUE, True)
        elif state in (PARAM, MESSAGE):
            ok = _is_alpha(c) or (state == PARAM and (c.isdigit() and c.isascii() or c == "_"))
            if ok:
                nxt, keep = state, True
            elif _is_space(c):
                nxt, keep = VALUE, False
            else:
                raise ModelfileError("unexpected EOF", line)
        else:  # COMMENT
            nxt, keep = (NIL, False) if _is_newline(c) else (COMMENT, False)

        if nxt != state:
            word = "".join(buf)
            if state == NAME:
                if word.lower() not in COMMANDS:
                    raise ModelfileError(f"command must be one of {', '.join(COMMANDS)}", line)
                low = word.lower()
                if low == "parameter":
                    nxt = PARAM
                elif low == "message":
                    nxt, name = MESSAGE, low
                else:
                    name = "model" if low == "from" else low
            elif state == PARAM:
                name = word
            elif state == MESSAGE:
                if word not in ROLES:
                    raise ModelfileError('message role must be one of "system", "user", or "assistant"', line)
                role = word
            elif state == VALUE:
                value, ok = _unquote(word.strip(" \t\r\n\v\f"))
                if not ok or _is_space(c):
                    buf.append(c)  # still inside a quoted value, or a space within the value
                    continue
                cmds.append(Command(name, f"{role}: {value}" if role else value, line - 1))
                role = ""
            buf = []
            state = nxt
        if keep and _is_print(c):
            buf.append(c)

    if state == VALUE:
        value, ok = _unquote("".join(buf).strip(" \t\r\n\v\f"))
        if not ok:
            raise ModelfileError("unexpected EOF: unterminated quoted value", line)
        cmds.append(Command(name, f"{role}: {value}" if role else value, line))
    elif state not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF", line)
    if not any(c.name == "model" for c in cmds):
        raise ModelfileError("no FROM line")
    return cmds


def format_param(name: str, value: str) -> object:
    """Typed value as Ollama's FormatParams would store it (stop: the raw string)."""
    if name in INT_PARAMS:
        if not _GO_INT.match(value):
            raise ModelfileError(f"invalid int value [{value}]")
        return int(value)
    if name in FLOAT_PARAMS:
        if not _GO_FLOAT.match(value):
            raise ModelfileError(f"invalid float value [{value}]")
        return float(value)
    if name in BOOL_PARAMS:
        if value not in _GO_BOOL:
            raise ModelfileError(f"invalid bool value [{value}]")
        return value in ("1", "t", "T", "TRUE", "true", "True")
    if name in LIST_PARAMS:
        return value
    raise ModelfileError(f"unknown parameter '{name}'")


def load(text: str) -> Modelfile:
    """Parse and type-check like `ollama create` does before contacting the server."""
    cmds = parse(text)
    mf = Modelfile(cmds)
    for c in cmds:
        if c.name == "model":
            mf.froms.append(c.args)
        elif c.name in ("template", "system"):
            setattr(mf, c.name, c.args)
        elif c.name == "license":
            mf.licenses.append(c.args)
        elif c.name == "message":
            role, _, msg = c.args.partition(": ")
            mf.messages.append((role, msg))
        elif c.name == "requires":
            if not _SEMVER.match(c.args):
                raise ModelfileError("requires must be a valid semver (e.g. 0.14.0)", c.line)
            mf.requires = c.args
        elif c.name in ("adapter", "draft", "renderer", "parser"):
            pass
        elif c.name in DEPRECATED_PARAMS:
            mf.warnings.append(f"warning: parameter {c.name} is deprecated")
        else:
            try:
                v = format_param(c.name, c.args)
            except ModelfileError as e:
                raise ModelfileError(str(e), c.line) from None
            if c.name in LIST_PARAMS:
                mf.params.setdefault(c.name, []).append(v)  # repeated lines append
            else:
                mf.params[c.name] = v
    return mf


def lint(mf: Modelfile) -> list[str]:
    """Forms Ollama accepts that do not do what the author meant."""
    problems = []
    for s in mf.params.get("stop", []):
        t = s.strip()
        if t.startswith("[") and t.endswith("]"):
            try:
                parsed = json.loads(t)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list) or "," in t:
                problems.append(
                    f"stop {s!r}: a list on one line is ONE literal stop string; "
                    f"write one PARAMETER stop line per string"
                )
    return problems


def validate(text: str) -> Modelfile:
    """load() + lint(): raises ModelfileError on anything Ollama rejects or lint flags."""
    mf = load(text)
    problems = lint(mf)
    if problems:
        raise ModelfileError("; ".join(problems))
    return mf
