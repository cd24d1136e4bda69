"""Ollama interop: the written Modelfile, its Go chat template, and the GGUF metadata Ollama reads.

Why a table for the Go template: Ollama executes TEMPLATE with Go's text/template, which Python
cannot run without Go (and CI has no Go). So EXPECTED below holds, per conversation, the prompt the
template renders, written out and reviewed by hand against the template. Three checks keep the
table honest:
1. every row is compared with the checkpoint's own Jinja chat template rendered by jinja2 for the
   same conversation (the reference, docs/reference-model.md §5.3), after the one documented Ollama
   difference (image tags, see `ollama_to_reference`);
2. the table is pinned to the template text by a hash: changing TEMPLATE fails
   `test_table_is_pinned_to_template` until the table is re-reviewed;
3. where `go` is installed, `test_go_executes_table` runs the real text/template on the real
   TEMPLATE and must reproduce every row (skipped only when `go` is missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import minicpmv.convert
from minicpmv.convert import modelfile as mf
from minicpmv.convert.config import CheckpointError
from minicpmv.convert.writer import OutputExistsError

from .ollama_modelfile_parser import ModelfileError, lint, load, parse, validate

REFERENCE_TOKENIZER_CONFIG = Path(minicpmv.convert.__file__).parent / "reference_files" / "tokenizer_config.json"


# ----------------------------------------------------------------------------------------------
# The written Modelfile passes the validator


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"GGUF")
    return p


def test_written_modelfile_passes_ollama_parser(tmp_path):
    lm, mm = _touch(tmp_path / "MiniCPM-V-4.5-Q4_K_M.gguf"), _touch(tmp_path / "mmproj-MiniCPM-V-4.5-F16.gguf")
    path = mf.write_modelfile(tmp_path, lm, mm)
    assert path == tmp_path / "Modelfile"
    m = validate(path.read_text(encoding="utf-8"))
    assert m.froms == ["./MiniCPM-V-4.5-Q4_K_M.gguf", "./mmproj-MiniCPM-V-4.5-F16.gguf"]  # LM first
    assert m.template == mf.TEMPLATE  # survives the """ quoting byte for byte
    assert m.system is None  # the reference has no default system prompt
    assert m.params == {
        "stop": ["<|im_end|>", "<|endoftext|>"],
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 100,
        "repeat_penalty": 1.03,
        "num_ctx": 8192,
    }
    assert m.warnings == [] and m.requires is None  # REQUIRES would break Ollama < 0.14
    # each PARAMETER stop line holds one token, quoted
    assert re.findall(r"^PARAMETER stop (.*)$", path.read_text(), re.M) == ['"<|im_end|>"', '"<|endoftext|>"']


def test_from_paths_are_relative_to_the_modelfile(tmp_path):
    lm = _touch(tmp_path / "weights" / "lm model.gguf")  # a space in the name is fine unquoted
    mm = _touch(tmp_path / "proj" / "mmproj.gguf")
    out = tmp_path / "ollama"
    m = validate(mf.write_modelfile(out, lm, mm).read_text(encoding="utf-8"))
    assert m.froms == ["../weights/lm model.gguf", "../proj/mmproj.gguf"]
    # Ollama resolves a relative FROM against the Modelfile's folder (parser.expandPath)
    for rel, real in zip(m.froms, (lm, mm)):
        assert Path(os.path.normpath(out / rel)) == real


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    lm, mm = _touch(tmp_path / "a.gguf"), _touch(tmp_path / "b.gguf")
    path = mf.write_modelfile(tmp_path, lm, mm)
    path.write_text("FROM ./hand-edited.gguf\n")
    with pytest.raises(OutputExistsError, match="Modelfile: output exists"):
        mf.write_modelfile(tmp_path, lm, mm)
    assert path.read_text() == "FROM ./hand-edited.gguf\n"
    with pytest.raises(ValueError, match="three double quotes"):  # fails before writing
        mf.write_modelfile(tmp_path, lm, mm, force=True, system='say """hi"""')
    assert path.read_text() == "FROM ./hand-edited.gguf\n"
    mf.write_modelfile(tmp_path, lm, mm, force=True)
    assert validate(path.read_text()).froms == ["./a.gguf", "./b.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "a.gguf", "b.gguf"]  # no temp left
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        mf.write_modelfile(tmp_path / "new", tmp_path / "missing.gguf", mm)
    assert not (tmp_path / "new").exists()


def test_system_prompt_round_trips():
    system = 'You are "MiniCPM-V".\n请用中文回答。\n  Indented line ending in a quote"'
    m = validate(mf.render_modelfile("lm.gguf", "mmproj.gguf", system=system, num_ctx=16384))
    assert m.system == system and m.params["num_ctx"] == 16384
    with pytest.raises(ValueError, match="num_ctx"):
        mf.render_modelfile("lm.gguf", "mmproj.gguf", num_ctx=512)
    with pytest.raises(ValueError, match="unusable"):
        mf.render_modelfile("lm.gguf\n", "mmproj.gguf")


# ----------------------------------------------------------------------------------------------
# The validator follows Ollama's rules: accepts the legal forms, rejects the known-bad ones

GOOD = """\ufeff# comment line
from ./lm.gguf
  FROM   /abs/mmproj.gguf
Template \"\"\"{{ .Prompt }}
second "line"\"\"\"
system "multi
line"
PARAMETER stop <|im_end|>
PARAMETER stop "<|endoftext|>"
PARAMETER num_ctx 4096
PARAMETER temperature .5
PARAMETER use_mmap false
PARAMETER mirostat 1
MESSAGE user hello there
LICENSE \"\"\"MIT\"\"\"
REQUIRES 0.14.0
"""


def test_validator_accepts_legal_forms():
    m = validate(GOOD)
    assert m.froms == ["./lm.gguf", "/abs/mmproj.gguf"]
    assert m.template == '{{ .Prompt }}\nsecond "line"'
    assert m.system == "multi\nline"
    assert m.params == {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 4096, "temperature": 0.5, "use_mmap": False}
    assert m.warnings == ["warning: parameter mirostat is deprecated"]
    assert m.messages == [("user", "hello there")] and m.licenses == ["MIT"] and m.requires == "0.14.0"


def test_cookbook_json_stop_list_is_one_literal_string():
    # OpenBMB's CookBook recipe (docs/ollama.md §3): Ollama accepts it, but as ONE stop string
    text = 'FROM ./m.gguf\nPARAMETER stop ["<|im_start|>","<|im_end|>"]\n'
    m = load(text)
    assert m.params["stop"] == ['["<|im_start|>","<|im_end|>"]']
    assert len(lint(m)) == 1 and "ONE literal stop string" in lint(m)[0]
    with pytest.raises(ModelfileError, match="PARAMETER stop line per string"):
        validate(text)


@pytest.mark.parametrize(
    "text, error",
    [
        ("PARAMETER temperature 0.7\n", "no FROM line"),
        ("FORM ./m.gguf\n", "command must be one of"),
        ("FROM ./m.gguf\nSTOP <|im_end|>\n", "command must be one of"),
        ("FROM\n", "command must be one of"),
        ("FROM ./m.gguf\nPARAMETER top_a 0.5\n", "unknown parameter 'top_a'"),
        ("FROM ./m.gguf\nPARAMETER Temperature 0.7\n", "unknown parameter 'Temperature'"),  # names are case-sensitive
        ("FROM ./m.gguf\nPARAMETER num_ctx 8k\n", "invalid int value"),
        ("FROM ./m.gguf\nPARAMETER num_ctx 8192.0\n", "invalid int value"),
        ("FROM ./m.gguf\nPARAMETER temperature hot\n", "invalid float value"),
        ("FROM ./m.gguf\nPARAMETER use_mmap yes\n", "invalid bool value"),
        ("FROM ./m.gguf\nPARAMETER stop-words x\n", "unexpected EOF"),
        ('FROM ./m.gguf\nPARAMETER stop ["<|im_end|>", "<|endoftext|>"]\n', "one PARAMETER stop line"),
        ('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\n', "unterminated"),
        ('FROM ./m.gguf\nSYSTEM "never closed\nsecond line\n', "unterminated"),
        ("FROM ./m.gguf\nMESSAGE tool hi\n", "message role must be one of"),
        ("FROM ./m.gguf\nREQUIRES latest\n", "valid semver"),
    ],
)
def test_validator_rejects_known_bad_forms(text, error):
    with pytest.raises(ModelfileError, match=re.escape(error)):
        validate(text)


def test_triple_quote_block_ends_at_first_closing_line():
    # Ollama has no escapes: a """ block ends at the first line whose text ends with """, so the
    # rest spills into new commands -- why render_modelfile refuses values containing """
    with pytest.raises(ModelfileError, match="command must be one of"):
        parse('FROM ./m.gguf\nSYSTEM """a """\nnot a command"""\n')
    assert [c.name for c in parse('FROM ./m.gguf\nSYSTEM """a """\n# ok\n')] == ["model", "system"]


# ----------------------------------------------------------------------------------------------
# Template logic: hand-reviewed table vs the reference Jinja template


@dataclass
class Turn:
    role: str
    text: str
    images: int = 0
    thinking: str = ""  # assistant only: the trace Ollama keeps in message.thinking


@dataclass
class Case:
    turns: list[Turn]
    think: bool | None  # Ollama's `think` (None: not sent) == reference enable_thinking
    expected: str  # what TEMPLATE renders for Ollama's messages (hand-reviewed)
    exact_image_newline: bool = field(default=False)  # user wrote "[img]\n" (see case below)


Q = "What is in the image?"
EXPECTED: dict[str, Case] = {
    # reference chat() default: thinking off -> empty think block after the assistant header
    "single_image_thinking_off": Case(
        [Turn("user", Q, images=1)],
        False,
        "<|im_start|>user\n[img-0]What is in the image?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    # enable_thinking=True opens the think block; Ollama's parser sees the prompt end in <think>
    "single_image_thinking_on": Case(
        [Turn("user", Q, images=1)],
        True,
        "<|im_start|>user\n[img-0]What is in the image?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    ),
    # enable_thinking undefined: nothing after the header (older Ollama without think defaults)
    "single_image_thinking_unset": Case(
        [Turn("user", Q, images=1)],
        None,
        "<|im_start|>user\n[img-0]What is in the image?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "system_prompt_text_only": Case(
        [Turn("system", "You are a helpful assistant."), Turn("user", "Hello!")],
        False,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    # the past answer's thinking is dropped from history; the new turn thinks again
    "multi_turn_past_thinking": Case(
        [
            Turn("user", "What landform is this?", images=1),
            Turn("assistant", "A mountain range.", thinking="Snowy peaks and ridges.\nSo mountains."),
            Turn("user", "Which country could it be in?"),
        ],
        True,
        "<|im_start|>user\n[img-0]What landform is this?<|im_end|>\n"
        "<|im_start|>assistant\nA mountain range.<|im_end|>\n"
        "<|im_start|>user\nWhich country could it be in?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n",
    ),
    "multi_turn_thinking_off_two_images": Case(
        [
            Turn("user", "Compare them.", images=2),
            Turn("assistant", "The left one is brighter.", thinking="Looking at both."),
            Turn("user", "And this one?", images=1),
        ],
        False,
        "<|im_start|>user\n[img-0][img-1]Compare them.<|im_end|>\n"
        "<|im_start|>assistant\nThe left one is brighter.<|im_end|>\n"
        "<|im_start|>user\n[img-2]And this one?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    # a trailing assistant message is a prefill: kept open (no <|im_end|>), its thinking kept
    "prefill_with_thinking": Case(
        [Turn("user", "Name a colour."), Turn("assistant", "Blue", thinking="Pick one.")],
        True,
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n<think>\nPick one.\n</think>\n\nBlue",
    ),
    # "[img]" in the text places the image (Ollama replaces it with [img-N]); writing "[img]\n"
    # first reproduces the reference's "(<image>./</image>)\n" separator exactly
    "image_placeholder_newline": Case(
        [Turn("user", "[img]\n" + Q, images=1)],
        False,
        "<|im_start|>user\n[img-0]\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        exact_image_newline=True,
    ),
}

# sha256 of mf.TEMPLATE the table was reviewed against (and run through Go text/template 1.19)
TEMPLATE_SHA256 = "ee669e9a446ca1b635ed418829a962b76313c00205e7a757452606761a37f6ed"


def ollama_messages(turns: list[Turn]) -> list[dict]:
    """Messages as Ollama hands them to the template: image tags put into the text by the server
    (server/prompt.go imageTaggedMessages: "[img-N]" prefixed, or replacing an "[img]" marker),
    numbered across the whole conversation; an assistant's thinking in its own field."""
    out, n = [], 0
    for t in turns:
        text, prefix = t.text, ""
        for _ in range(t.images):
            if "[img]" in text:
                text = text.replace("[img]", f"[img-{n}]", 1)
            else:
                prefix += f"[img-{n}]"
            n += 1
        out.append({"role": t.role, "content": prefix + text, "thinking": t.thinking, "images": []})
    return out


def reference_messages(turns: list[Turn]) -> list[dict]:
    """The same conversation as the reference chat() builds it (docs/reference-model.md §5.4, §6.3): each image
    is the tag "(<image>./</image>)", content items joined with "\\n"; an answer given with
    thinking is stored as chat() returns it, "<think>\\n...</think>\\n\\n" + answer."""
    out = []
    for t in turns:
        if t.role == "assistant":
            content = f"<think>\n{t.thinking}\n</think>\n\n{t.text}" if t.thinking else t.text
        elif "[img]" in t.text:
            content = t.text.replace("[img]", "(<image>./</image>)")
        else:
            content = "\n".join(["(<image>./</image>)"] * t.images + [t.text])
        out.append({"role": t.role, "content": content})
    return out


def render_reference(turns: list[Turn], think: bool | None) -> str:
    cfg = json.loads(REFERENCE_TOKENIZER_CONFIG.read_text(encoding="utf-8"))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers does
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    tmpl = env.from_string(cfg["chat_template"])
    prefill = turns[-1].role == "assistant"
    kwargs = {} if think is None else {"enable_thinking": think}
    text = tmpl.render(messages=reference_messages(turns), add_generation_prompt=not prefill, **kwargs)
    if prefill:  # transformers' continue_final_message: the final turn stays open
        assert text.endswith("<|im_end|>\n")
        text = text[: -len("<|im_end|>\n")]
    return text


def ollama_to_reference(rendered: str, exact_image_newline: bool) -> str:
    """The one Ollama-specific difference: an image is a "[img-N]" tag (swapped for the image
    embeddings by the runner) glued to the text, where the reference writes "(<image>./</image>)"
    and a "\\n" before the text. With "[img]\\n" in the user's text the newline is already there."""
    sep = "" if exact_image_newline else "\n"
    return re.sub(r"\[img-\d+\]", "(<image>./</image>)" + sep, rendered)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_table_agrees_with_reference_jinja(name):
    case = EXPECTED[name]
    ref = render_reference(case.turns, case.think)
    assert ollama_to_reference(case.expected, case.exact_image_newline) == ref


def test_table_is_pinned_to_template():
    digest = hashlib.sha256(mf.TEMPLATE.encode()).hexdigest()
    assert digest == TEMPLATE_SHA256, (
        "TEMPLATE changed: re-review EXPECTED by hand (and run test_go_executes_table with Go), "
        f"then set TEMPLATE_SHA256 = {digest!r}"
    )


def test_template_structure_for_ollama():
    t = mf.TEMPLATE
    # Ollama's capability check (thinking.InferTags): .Thinking inside `range .Messages`, in a block
    # whose first and last text are the literal tags
    loop = t[t.index("range $i, $_ := .Messages") :]
    assert re.search(r"\}\}<think>\n\{\{ \.Thinking \}\}\n</think>\n\n\{\{ end \}\}", loop)
    assert "$.IsThinkSet" in t and "$.Think " in t
    assert '"""' not in t and t.count("{{") == t.count("}}")
    assert "{{ .Content }}" in t and ".Images" not in t  # Ollama already placed [img-N] in .Content


GO_HELPER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role     string   `json:"role"`
	Content  string   `json:"content"`
	Thinking string   `json:"thinking"`
	Images   []string `json:"images"`
}

type Case struct {
	Messages []*Message `json:"messages"`
	Think    *bool      `json:"think"`
}

// tags: first/last literal text of the innermost list holding a .Thinking field that sits
// inside a range over .Messages (the heuristic Ollama uses to infer thinking tags)
func tags(root *parse.ListNode) (string, string) {
	open, close := "", ""
	var walk func(n parse.Node, lists []*parse.ListNode, inMsgs bool)
	walk = func(n parse.Node, lists []*parse.ListNode, inMsgs bool) {
		switch x := n.(type) {
		case *parse.ListNode:
			for _, c := range x.Nodes {
				walk(c, append(lists, x), inMsgs)
			}
		case *parse.ActionNode:
			walk(x.Pipe, lists, inMsgs)
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				for _, a := range c.Args {
					walk(a, lists, inMsgs)
				}
			}
		case *parse.FieldNode:
			if inMsgs && x.Ident[0] == "Thinking" && len(lists) > 0 {
				l := lists[len(lists)-1]
				if t, ok := l.Nodes[0].(*parse.TextNode); ok {
					open = strings.TrimSpace(string(t.Text))
				}
				if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
					close = strings.TrimSpace(string(t.Text))
				}
			}
		case *parse.IfNode:
			walk(x.Pipe, lists, inMsgs)
			walk(x.List, lists, inMsgs)
			if x.ElseList != nil {
				walk(x.ElseList, lists, inMsgs)
			}
		case *parse.RangeNode:
			in := inMsgs || strings.Contains(x.Pipe.String(), ".Messages")
			walk(x.Pipe, lists, in)
			walk(x.List, lists, in)
			if x.ElseList != nil {
				walk(x.ElseList, lists, in)
			}
		}
	}
	walk(root, nil, false)
	return open, close
}

func main() {
	var in struct {
		Template string `json:"template"`
		Cases    []Case `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	outs := []string{}
	for _, c := range in.Cases {
		var system []string
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var sb strings.Builder
		// the values Ollama's template.Execute passes for a .Messages template
		err := tmpl.Execute(&sb, map[string]any{
			"System": strings.Join(system, "\n\n"), "Messages": c.Messages, "Tools": nil,
			"Response": "", "Think": c.Think != nil && *c.Think, "IsThinkSet": c.Think != nil,
		})
		if err != nil {
			panic(err)
		}
		outs = append(outs, sb.String())
	}
	open, close := tags(tmpl.Tree.Root)
	json.NewEncoder(os.Stdout).Encode(map[string]any{"outputs": outs, "open": open, "close": close})
}
"""


def test_go_executes_table(tmp_path):
    go = shutil.which("go")
    if go is None:
        pytest.skip("go not installed: the hand-reviewed table stands in for text/template")
    (tmp_path / "main.go").write_text(GO_HELPER)
    names = sorted(EXPECTED)
    payload = {
        "template": mf.TEMPLATE,
        "cases": [{"messages": ollama_messages(EXPECTED[n].turns), "think": EXPECTED[n].think} for n in names],
    }
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", GO111MODULE="auto")
    r = subprocess.run(
        [go, "run", "main.go"],
        cwd=tmp_path,
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for n, got in zip(names, out["outputs"]):
        assert got == EXPECTED[n].expected, n
    assert (out["open"], out["close"]) == ("<think>", "</think>")


# ----------------------------------------------------------------------------------------------
# GGUF metadata Ollama reads (docs/ollama.md §2), and --modelfile-only detection


def _kv(path: Path) -> dict[str, object]:
    """Metadata values (the big tokenizer arrays skipped)."""
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith(("tokenizer.ggml.", "GGUF."))}


def ollama_layer_kind(kv: dict[str, object]) -> tuple[str, str]:
    """How `ollama create` classifies a GGUF: (new rule >= v0.30.4, old rule of 2025 releases)."""
    arch = kv.get("general.architecture", "")
    block = int(kv.get(f"{arch}.block_count", 0) or 0)
    vblock = int(kv.get(f"{arch}.vision.block_count", 0) or 0)
    gtype = kv.get("general.type", "")
    if gtype == "adapter":
        return "adapter", "adapter"
    old = "projector" if (block == 0 and vblock > 0) or gtype == "projector" else "model"
    new = (
        "projector"
        if (
            gtype in ("projector", "mmproj")
            or (block == 0 and vblock > 0)
            or (
                arch == "clip"
                and block == 0
                and (kv.get("clip.has_vision_encoder") or kv.get("clip.has_audio_encoder"))
            )
        )
        else "model"
    )
    return new, old


def _fixture_or_skip(request, name: str):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {name} not provided by conftest yet")


def _fixture_path(request, name: str, arg: str) -> Path:
    fx = _fixture_or_skip(request, name)
    return Path(fx(arg) if callable(fx) else fx)


def test_mmproj_has_what_ollama_projector_detection_needs(request):
    kv = _kv(_fixture_path(request, "tiny_mmproj_gguf", "f32"))
    assert kv["general.architecture"] == "clip"
    assert kv["clip.has_vision_encoder"] is True or kv["clip.has_vision_encoder"] == 1
    assert kv["general.type"] == "mmproj"
    assert kv["clip.projector_type"] == "resampler"  # else Ollama injects projector_type=mlp
    assert int(kv["clip.vision.block_count"]) > 0
    assert ollama_layer_kind(kv) == ("projector", "projector")  # old and new Ollama alike


def test_lm_has_what_ollama_needs_for_family_size_and_template(request):
    kv = _kv(_fixture_path(request, "tiny_lm_gguf", "F32"))
    assert kv["general.architecture"] == "qwen3"  # model_family
    assert kv.get("general.size_label") or kv.get("general.name")
    assert kv.get("general.type", "model") == "model"
    assert ollama_layer_kind(kv) == ("model", "model")
    tmpl = kv.get("tokenizer.chat_template")
    assert tmpl, "tokenizer.chat_template missing"
    # llama-server --jinja / recent Ollama: thinking support is detected from these tags
    assert "<think>" in tmpl and "</think>" in tmpl and "enable_thinking" in tmpl
    ref = json.loads(REFERENCE_TOKENIZER_CONFIG.read_text(encoding="utf-8"))["chat_template"]
    assert tmpl == ref


def test_modelfile_only_finds_files_by_metadata_with_real_conversions(request, tmp_path):
    lm = _fixture_path(request, "tiny_lm_gguf", "F32")
    mm = _fixture_path(request, "tiny_mmproj_gguf", "f32")
    # names chosen to mislead: detection must read general.architecture, not file names
    shutil.copyfile(lm, tmp_path / "mmproj-looking-name.gguf")
    shutil.copyfile(mm, tmp_path / "model.gguf")
    path = mf.modelfile_for_existing(tmp_path)
    assert validate(path.read_text()).froms == ["./mmproj-looking-name.gguf", "./model.gguf"]


def _tiny_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(path, arch)
    if arch == "clip":
        w.add_bool("clip.has_vision_encoder", True)
    w.add_tensor("t.weight", np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_modelfile_for_existing_folder_and_files(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    lm = _tiny_gguf(d / "b-projector.gguf", "qwen3")
    mm = _tiny_gguf(d / "a-language-model.gguf", "clip")
    (d / "notes.txt").write_text("ignored")
    path = mf.modelfile_for_existing(d)
    assert path == d / "Modelfile"
    assert validate(path.read_text()).froms == ["./b-projector.gguf", "./a-language-model.gguf"]
    with pytest.raises(OutputExistsError):
        mf.modelfile_for_existing(d)
    # the two files given explicitly, Modelfile elsewhere
    out = tmp_path / "out"
    p2 = mf.modelfile_for_existing(mm, lm, out_dir=out)
    assert validate(p2.read_text()).froms == ["../models/b-projector.gguf", "../models/a-language-model.gguf"]


@pytest.mark.parametrize(
    "setup, error",
    [
        (lambda d: [_tiny_gguf(d / "x.gguf", "qwen3")], "exactly one mmproj"),
        (lambda d: [_tiny_gguf(d / "x.gguf", "clip")], "exactly one language-model"),
        (
            lambda d: [
                _tiny_gguf(d / "a.gguf", "qwen3"),
                _tiny_gguf(d / "b.gguf", "qwen3"),
                _tiny_gguf(d / "c.gguf", "clip"),
            ],
            "found",
        ),
        (lambda d: [_tiny_gguf(d / "a.gguf", "llama"), _tiny_gguf(d / "c.gguf", "clip")], "'llama'"),
        (
            lambda d: [(d / "a.gguf").write_bytes(b"not a gguf at all, just text"), _tiny_gguf(d / "c.gguf", "clip")],
            "a.gguf: not a GGUF file (starts with 6e 6f 74 20)",
        ),
        (lambda d: [], "no .gguf files"),
    ],
)
def test_modelfile_for_existing_rejects_bad_folders(tmp_path, setup, error):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(error)):
        mf.modelfile_for_existing(tmp_path)
    assert not (tmp_path / "Modelfile").exists()
