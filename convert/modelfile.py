"""Ollama Modelfile for our two GGUF files (language model + vision mmproj).

`ollama create NAME -f OUT/Modelfile` imports both files: every local `FROM` is hashed and uploaded,
and Ollama classifies each GGUF by its metadata (the mmproj by `general.architecture = clip` /
`general.type = mmproj`), so the two FROM lines yield one model layer and one projector layer.
Facts behind every choice here: docs/ollama.md.

The TEMPLATE is a Go text/template over `.Messages` that reproduces the checkpoint's Jinja chat
template (docs/reference-model.md §5.3) for the conversations Ollama can send: ChatML turns, past answers
without their thinking, and the `enable_thinking` generation prompt driven by Ollama's `think`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from minicpmv.gguf_info import ModelFileError, find_model_files
from minicpmv.schema import REFERENCE_SAMPLING, STOP_TOKENS

from .config import CheckpointError
from .writer import OutputSet, check_output

MODELFILE_NAME = "Modelfile"

# Reference chat() sampling without thinking (docs/reference-model.md §6.2), as Ollama parameters.
# (llama.cpp's MiniCPM-V docs suggest --repeat-penalty 1.05.)
SAMPLING = (
    ("temperature", REFERENCE_SAMPLING.temperature),
    ("top_p", REFERENCE_SAMPLING.top_p),
    ("top_k", REFERENCE_SAMPLING.top_k),
    ("repeat_penalty", REFERENCE_SAMPLING.repetition_penalty),
)

# Context window. One image costs up to ~665 tokens (overview + 3x3 slices of 64 query tokens each,
# docs/reference-model.md §5.1); Ollama's own prompt budget assumes 768 per image
# (docs/ollama.md §5). 8192 holds four fully sliced images, the reference's max_new_tokens (2048)
# and some history or a thinking trace, for ~1.1 GiB of f16 KV cache on Qwen3-8B
# (36 layers x 8 KV heads x 128 x 2 x 2 bytes = 144 KiB/token).
# Ollama's default (4096 below 24 GiB VRAM, 2048 in older releases) cuts long thinking answers.
NUM_CTX = 8192

# ChatML over .Messages, mirroring the Jinja template of the checkpoint:
# - system/user turns: "<|im_start|>{role}\n{content}<|im_end|>\n". Ollama has already put its
#   image tags ("[img-0]"...) into .Content, so images land where the user placed them.
# - assistant turns before the last user turn drop their thinking (the reference strips it from
#   history); turns after it (tool loops, or a trailing assistant message = prefill) keep it as
#   "<think>\n{thinking}\n</think>\n\n". A trailing assistant message is left open (no <|im_end|>)
#   so the model continues it.
# - `.Thinking` sits inside `range .Messages` between literal <think>/</think> text, which is how
#   Ollama infers the tags and grants the "thinking" capability.
# - generation prompt: think=true -> "<think>\n" (reference enable_thinking=True); think=false ->
#   empty think block (enable_thinking=False, the reference chat() default); think not sent ->
#   nothing (enable_thinking undefined). Recent Ollama sends think=true by default for models with
#   the thinking capability, so `--think=false` selects the reference's default mode.
# - $lastUser starts at len(.Messages): with no user turn no assistant turn counts as "after the
#   last query", like the Jinja default last_query_index = len(messages) - 1.
TEMPLATE = """\
{{- $lastUser := len .Messages }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}<|im_start|>system
{{ .Content }}<|im_end|>
{{ else if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and (gt $i $lastUser) (or $last .Thinking) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ if $.IsThinkSet }}{{ if $.Think }}<think>
{{ else }}<think>

</think>

{{ end }}{{ end }}
{{- end }}
{{- end }}"""

_HEADER = """\
# Ollama Modelfile for MiniCPM-V 4.5, written by minicpm-convert.
#   ollama create minicpm-v45 -f {modelfile}
#   ollama run minicpm-v45 --think=false "Describe this image: ./photo.jpg"
# Needs Ollama >= 0.12.4 (first release whose llama.cpp knows MiniCPM-V 4.5's vision encoder).
# Thinking: Ollama's `think` request field (CLI --think / --think=false, /set think) toggles the
# model's <think> block; recent Ollama turns it on by default for thinking-capable models.
# Video is not supported by Ollama: sample frames and send them as images, or use minicpm-run.
"""


def _quote_block(text: str, what: str) -> str:
    """`\"\"\"...\"\"\"` value for Ollama's parser, which has no escapes: a value cannot hold `\"\"\"`."""
    if '"""' in text:
        raise ValueError(f'{what}: cannot contain three double quotes (""") in an Ollama Modelfile')
    return f'"""{text}"""'


def _from_path(path: str) -> str:
    """A FROM value: a relative path is made explicit (./x) so it is not mistaken for a model name."""
    p = path.replace("\\", "/")
    if not p or p != p.strip() or "\n" in p or "\r" in p or p.startswith('"'):
        raise ValueError(f"{path!r}: path unusable in a Modelfile FROM line (whitespace, newline or quote)")
    if not (p.startswith("/") or p.startswith("./") or p.startswith("../") or (len(p) > 1 and p[1] == ":")):
        p = "./" + p
    return p


def render_modelfile(lm_file: str, mmproj_file: str, *, num_ctx: int = NUM_CTX, system: str | None = None) -> str:
    """Modelfile text. Paths are written as given (relative ones are resolved by Ollama against
    the Modelfile's folder)."""
    if num_ctx < 1024:
        raise ValueError(f"num_ctx={num_ctx}: too small for even one sliced image (~665 tokens) plus an answer")
    lines = [_HEADER.format(modelfile=MODELFILE_NAME).rstrip("\n"), ""]
    lines.append("# language model first, vision projector (mmproj) second")
    lines.append(f"FROM {_from_path(lm_file)}")
    lines.append(f"FROM {_from_path(mmproj_file)}")
    lines.append("")
    lines.append(f"TEMPLATE {_quote_block(TEMPLATE, 'TEMPLATE')}")
    if system:
        lines.append("")
        lines.append(f"SYSTEM {_quote_block(system, 'system prompt')}")
    lines.append("")
    # the reference stops on both; Ollama needs one line per string (a JSON list on one line
    # would become ONE literal stop string)
    lines.append("# one line per stop string")
    lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    lines.append("# sampling of the reference chat(); llama.cpp's docs use repeat_penalty 1.05")
    lines += [f"PARAMETER {k} {v}" for k, v in SAMPLING]
    lines.append("# room for several fully sliced images (~665 tokens each) and a 2048-token answer")
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    out_dir: Path,
    lm_path: Path,
    mmproj_path: Path,
    force: bool = False,
    *,
    num_ctx: int = NUM_CTX,
    system: str | None = None,
    outputs: OutputSet | None = None,
) -> Path:
    """Write OUT/Modelfile with FROM paths relative to OUT. Refuses to overwrite an existing
    Modelfile unless force (raises writer.OutputExistsError). With `outputs`, the Modelfile joins that
    set of files (renamed together with the GGUFs it names, which need not exist yet); otherwise it
    is written atomically on its own."""
    out_dir = Path(out_dir)
    target = out_dir / MODELFILE_NAME
    if outputs is None:
        check_output(target, force)
        for p in (lm_path, mmproj_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: GGUF file not found")
    base = os.path.abspath(out_dir)
    text = render_modelfile(
        os.path.relpath(os.path.abspath(lm_path), base),
        os.path.relpath(os.path.abspath(mmproj_path), base),
        num_ctx=num_ctx,
        system=system,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(outputs) if outputs is not None else OutputSet(force) as outs:
        with open(outs.add(target), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return target


# ----------------------------------------------------------------------------------------------
# Modelfile for GGUF files that already exist (`minicpm-convert --modelfile-only DIR`)


def modelfile_for_existing(
    *paths: Path, out_dir: Path | None = None, force: bool = False, num_ctx: int = NUM_CTX, system: str | None = None
) -> Path:
    """Write a Modelfile for GGUF files that already exist, without converting.

    `paths`: a folder holding the language-model GGUF and the mmproj GGUF, or the two files. The
    Modelfile goes to `out_dir` (default: the folder given, else the language model's folder)."""
    if not paths:
        raise CheckpointError("modelfile: give a folder or the two GGUF files")
    try:
        lm_path, mm_path = find_model_files(*paths)
    except ModelFileError as e:
        raise CheckpointError(str(e)) from None
    if out_dir is None:
        first = Path(paths[0])
        out_dir = first if first.is_dir() else lm_path.parent
    return write_modelfile(Path(out_dir), lm_path, mm_path, force, num_ctx=num_ctx, system=system)
