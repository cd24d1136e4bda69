"""Weight buffer types (runtime/buffers.py): never llama.cpp's AMX buffers, CPU_REPACK kept.

The decision is tested with the library's features and the CPU's flags given, not read from this
machine; the by-name CPU_REPACK placement is checked against llama.cpp's own placement on this
machine; and every quantized model runs a batched prefill in a subprocess (a SIGILL there is a
failed test with a message, not a dead test run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import gguf
import pytest

from minicpmv.runtime.buffers import choose, library_features, override_patterns, repack_tensors

QT = gguf.GGMLQuantizationType
ZEN4_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
             "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
SPR_INFO = ZEN4_INFO.replace("REPACK = 1 |", "AMX_INT8 = 1 | REPACK = 1 |")
SPR_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}
ZEN4_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}


def test_library_features_parse():
    f = library_features(SPR_INFO)
    assert f["AVX2"] == "1" and f["AMX_INT8"] == "1" and f["REPACK"] == "1" and f["SSE3"] == "1"
    assert "AMX_INT8" not in library_features(ZEN4_INFO)


@pytest.mark.parametrize("info, flags, machine, gpu, mode", [
    (SPR_INFO, SPR_FLAGS, "x86_64", False, "repack"),     # the crash of issue 12: AMX never used
    (SPR_INFO, ZEN4_FLAGS, "x86_64", False, "repack"),    # an AMX wheel on a CPU without AMX
    (ZEN4_INFO, SPR_FLAGS, "x86_64", False, "llama"),     # AMX CPU, library without AMX code
    (ZEN4_INFO, ZEN4_FLAGS, "x86_64", False, "llama"),
    (SPR_INFO, SPR_FLAGS, "x86_64", True, "llama"),       # offloaded to a GPU
    (SPR_INFO.replace("REPACK = 1 |", ""), SPR_FLAGS, "x86_64", False, "none"),
    ("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | REPACK = 1 |", {"asimd", "asimddp"}, "aarch64", False, "llama"),
])
def test_choice(info, flags, machine, gpu, mode):
    plan = choose(library_features(info), machine, flags, gpu=gpu)
    assert plan.mode == mode, plan.reason
    assert plan.use_extra_bufts == (mode == "llama")
    assert plan.reason and "\n" not in plan.reason


def test_forced_choice():
    for m in ("llama", "repack", "none"):
        assert choose(library_features(SPR_INFO), "x86_64", SPR_FLAGS, forced=m).mode == m
    with pytest.raises(ValueError, match="MINICPMV_WEIGHT_BUFFERS"):
        choose({}, "x86_64", set(), forced="amx")


def test_repack_rules_mirror_x86_kernels():
    avx2 = {"AVX2": "1"}
    avx512 = {"AVX2": "1", "AVX512": "1"}
    t = [("blk.0.attn_q.weight", (4096, 4096), QT.Q4_K), ("blk.0.ffn_down.weight", (12288, 4096), QT.Q6_K),
         ("blk.0.attn_v.weight", (4096, 1024), QT.Q4_0), ("blk.0.ffn_up.weight", (4096, 12288), QT.Q8_0),
         ("blk.0.attn_k.weight", (4096, 1020), QT.Q4_K), ("blk.0.attn_norm.weight", (4096,), QT.F32),
         ("token_embd.weight", (4096, 151748), QT.Q4_K), ("output.weight", (4096, 151748), QT.Q2_K),
         ("blk.1.ffn_gate.weight", (4096, 12288), QT.IQ4_NL), ("blk.1.ffn_down.weight", (12288, 4096), QT.Q2_K)]
    assert repack_tensors(t, avx2) == ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_gate.weight"]
    # Q2_K needs AVX-512; the real vocabulary (151748 rows) is not a multiple of 8
    assert repack_tensors(t, avx512)[-2:] == ["blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"]
    assert repack_tensors(t, {}) == []


def test_override_patterns_match_exactly():
    names = [f"blk.{i}.{k}.weight" for i in range(36) for k in ("attn_q", "ffn_up", "attn_q_norm")] + \
            ["output.weight", "output_norm.weight", "token_embd.weight"]
    chosen = [n for n in names if ("attn_q." in n and not n.startswith("blk.1.")) or n == "output.weight"
              or n in ("blk.11.ffn_up.weight", "blk.3.ffn_up.weight")]
    pats = override_patterns(chosen)
    assert len(pats) == 3
    for n in names:  # llama.cpp uses std::regex_search (ECMAScript): these patterns mean the same in re
        assert any(re.search(p, n) for p in pats) == (n in chosen), n


# --------------------------------------------------------------------------- against llama.cpp

LOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from minicpmv.runtime.buffers import BufferPlan
    from minicpmv.runtime.llama import ContextParams, LlamaContext, LlamaModel
    path, mode = sys.argv[1], sys.argv[2]
    # verbose="debug": llama.cpp's every log line on stderr, where the test reads the placement
    m = LlamaModel(path, n_gpu_layers=0, verbose="debug",
                   buffers=BufferPlan(mode, "test") if mode != "auto" else None)
    ctx = LlamaContext(m, ContextParams(n_ctx=256, n_batch=128, n_threads=2))
    toks = [(7 * i + 3) % m.n_vocab for i in range(96)]
    ctx.decode_tokens(toks, 0)            # one batched prefill of 96 tokens: the AMX crash site
    lg = ctx.logits().copy()
    print(json.dumps({"mode": m.buffers.plan.mode, "repacked": m.buffers.repacked,
                      "finite": bool(np.isfinite(lg).all()), "logits": lg[:64].tolist()}))
""")


def _run(path, mode: str) -> tuple[dict, dict[str, float], set[str]]:
    """(result, {buffer: MiB}, names llama.cpp repacked) of one load + batched prefill in a subprocess."""
    r = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (f"{path.name} with weight buffers {mode!r}: exit {r.returncode} "
                               f"(a negative code is a signal, -4 = SIGILL); stderr tail: {r.stderr[-800:]}")
    sizes = {m.group(1): float(m.group(2))
             for m in re.finditer(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", r.stderr)}
    repacked = set(re.findall(r"repack tensor (\S+) with", r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1]), sizes, repacked


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q4_0", "Q8_0"])
def test_quantized_models_prefill_with_the_shipped_choice(tiny_lm_gguf, qtype):
    out, _, _ = _run(tiny_lm_gguf(qtype), "auto")
    assert out["finite"]


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q4_0"])
def test_repack_by_name_equals_llamacpp_own_placement(tiny_lm_gguf, qtype):
    """The AMX-safe placement ("repack") puts exactly the bytes in CPU_REPACK that llama.cpp's own
    choice does on this machine (which has no AMX buffers to hand out), and computes the same logits."""
    import llama_cpp
    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        pytest.fail("this llama.cpp has AMX: its own placement cannot serve as the oracle here")
    path = tiny_lm_gguf(qtype)
    own, own_sizes, own_repacked = _run(path, "llama")
    ours, our_sizes, our_repacked = _run(path, "repack")
    assert own_repacked, "llama.cpp repacked nothing: the oracle says nothing"
    assert set(ours["repacked"]) == our_repacked == own_repacked
    assert our_sizes == own_sizes and own_sizes.get("CPU_REPACK", 0) > 0
    assert ours["logits"] == own["logits"]
    plain, plain_sizes, plain_repacked = _run(path, "none")
    assert "CPU_REPACK" not in plain_sizes and not plain_repacked and plain["finite"]


def test_version_prints_the_system_report():
    r = subprocess.run([sys.executable, "-m", "minicpmv.cli.run", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
                for line in r.stdout.splitlines())
    for key in ("minicpmv", "llama-cpp-python", "torch", "gguf", "cpu", "cpu flags", "llama.cpp build",
                "weight buffers", "model load", "vision dtype auto", "threads"):
        assert rows.get(key), f"--version lacks {key!r}:\n{r.stdout}"
    from minicpmv.runtime.buffers import plan_for_this_machine
    assert rows["weight buffers"].startswith(plan_for_this_machine().mode + ":")
    from minicpmv.runtime.llama import LOAD_MAPPED, LOAD_MAPPED_DROPPED, LOAD_READ
    # Linux (CPU): mapped and pages dropped; macOS: mapped for Metal; elsewhere read
    expected = LOAD_MAPPED_DROPPED if sys.platform.startswith("linux") else \
        LOAD_MAPPED if sys.platform == "darwin" else LOAD_READ
    assert rows["model load"] == expected
    assert "ms in f32" in rows["vision dtype auto"] and "ms in bf16" in rows["vision dtype auto"]
