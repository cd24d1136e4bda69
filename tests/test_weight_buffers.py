"""Weight buffer types (runtime/weight_buffers.py): never llama.cpp's AMX buffers, CPU_REPACK kept.

The decision is tested with the library's features and the CPU's flags given, not read from this
machine. The by-name CPU_REPACK placement is checked against ggml's own answer (the CPU device's
supports_op, asked through the C API the way llama.cpp's loader asks it: tests/ggml_repack_oracle.py),
against the tensors llama.cpp logs as repacked, and by its logits against plain CPU buffers; none of
that needs llama.cpp's own placement, which uses the crashing AMX buffers where the library has AMX.
Where it has none, the by-name placement is also compared with llama.cpp's own (not run on AMX builds).
Every quantized model runs a batched prefill in a subprocess (a SIGILL there is a failed test with a
message, not a dead test run).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from minicpmv.runtime.weight_buffers import (
    choose,
    library_features,
    override_patterns,
    repack_tensors,
    repack_tensors_in,
)

from .ggml_repack_oracle import repack_tensors_by_ggml, repack_tensors_by_ggml_in

QT = gguf.GGMLQuantizationType
ZEN4_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
SPR_INFO = ZEN4_INFO.replace("REPACK = 1 |", "AMX_INT8 = 1 | REPACK = 1 |")
SPR_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}
ZEN4_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}


def test_library_features_parse():
    f = library_features(SPR_INFO)
    assert f["AVX2"] == "1" and f["AMX_INT8"] == "1" and f["REPACK"] == "1" and f["SSE3"] == "1"
    assert "AMX_INT8" not in library_features(ZEN4_INFO)


@pytest.mark.parametrize(
    "info, flags, machine, gpu, mode",
    [
        (SPR_INFO, SPR_FLAGS, "x86_64", False, "repack"),  # the crash of issue 12: AMX never used
        (SPR_INFO, ZEN4_FLAGS, "x86_64", False, "repack"),  # an AMX wheel on a CPU without AMX
        (ZEN4_INFO, SPR_FLAGS, "x86_64", False, "llama"),  # AMX CPU, library without AMX code
        (ZEN4_INFO, ZEN4_FLAGS, "x86_64", False, "llama"),
        (SPR_INFO, SPR_FLAGS, "x86_64", True, "llama"),  # offloaded to a GPU
        (SPR_INFO.replace("REPACK = 1 |", ""), SPR_FLAGS, "x86_64", False, "none"),
        ("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | REPACK = 1 |", {"asimd", "asimddp"}, "aarch64", False, "llama"),
    ],
)
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
    t = [
        ("blk.0.attn_q.weight", (4096, 4096), QT.Q4_K),
        ("blk.0.ffn_down.weight", (12288, 4096), QT.Q6_K),
        ("blk.0.attn_v.weight", (4096, 1024), QT.Q4_0),
        ("blk.0.ffn_up.weight", (4096, 12288), QT.Q8_0),
        ("blk.0.attn_k.weight", (4096, 1020), QT.Q4_K),
        ("blk.0.attn_norm.weight", (4096,), QT.F32),
        ("token_embd.weight", (4096, 151748), QT.Q4_K),
        ("output.weight", (4096, 151748), QT.Q2_K),
        ("blk.1.ffn_gate.weight", (4096, 12288), QT.IQ4_NL),
        ("blk.1.ffn_down.weight", (12288, 4096), QT.Q2_K),
    ]
    assert repack_tensors(t, avx2) == ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_gate.weight"]
    # Q2_K needs AVX-512; the real vocabulary (151748 rows) is not a multiple of 8
    assert repack_tensors(t, avx512)[-2:] == ["blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"]
    assert repack_tensors(t, {}) == []


def test_override_patterns_match_exactly():
    names = [f"blk.{i}.{k}.weight" for i in range(36) for k in ("attn_q", "ffn_up", "attn_q_norm")] + [
        "output.weight",
        "output_norm.weight",
        "token_embd.weight",
    ]
    chosen = [
        n
        for n in names
        if ("attn_q." in n and not n.startswith("blk.1."))
        or n == "output.weight"
        or n in ("blk.11.ffn_up.weight", "blk.3.ffn_up.weight")
    ]
    pats = override_patterns(chosen)
    assert len(pats) == 3
    for n in names:  # llama.cpp uses std::regex_search (ECMAScript): these patterns mean the same in re
        assert any(re.search(p, n) for p in pats) == (n in chosen), n


# --------------------------------------------------------------------------- against llama.cpp

LOAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from minicpmv.runtime.weight_buffers import BufferPlan
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.llama_context import ContextParams, LlamaContext
    path, mode = sys.argv[1], sys.argv[2]
    # verbose="debug": llama.cpp's every log line on stderr, where the test reads the placement
    m = LlamaModel(path, n_gpu_layers=0, verbose="debug",
                   buffers=BufferPlan(mode, "test") if mode != "auto" else None)
    ctx = LlamaContext(m, ContextParams(n_ctx=256, n_batch=128, n_threads=2))
    toks = [(7 * i + 3) % m.n_vocab for i in range(96)]
    ctx.decode_tokens(toks, 0)            # one batched prefill of 96 tokens: the AMX crash site
    lg = ctx.logits().copy()
    print(json.dumps({"mode": m.buffers.plan.mode, "repacked": m.buffers.repacked,
                      "finite": bool(np.isfinite(lg).all()), "logits": lg.tolist()}))
""")


def _run(path, mode: str) -> tuple[dict, dict[str, float], set[str]]:
    """(result, {buffer: MiB}, names llama.cpp repacked) of one load + batched prefill in a subprocess."""
    r = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (
        f"{path.name} with weight buffers {mode!r}: exit {r.returncode} "
        f"(a negative code is a signal, -4 = SIGILL); stderr tail: {r.stderr[-800:]}"
    )
    sizes = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", r.stderr)
    }
    repacked = set(re.findall(r"repack tensor (\S+) with", r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1]), sizes, repacked


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q4_0", "Q8_0"])
def test_quantized_models_prefill_with_the_shipped_choice(tiny_lm_gguf, qtype):
    out, _, _ = _run(tiny_lm_gguf(qtype), "auto")
    assert out["finite"]


# repack vs none logits: max |diff| / (max - min) of the last position's logits. Measured on the AMX Xeon
# (family 6 model 167, 2 cores): 0.0030 (Q4_K_M) and 0.0052 (Q4_0) with this test's tokens, at most 0.0079
# over six other token sequences (the two placements run different kernels and summation orders). A
# mis-repacked weight gives logits of another model, off by a sizable part of the range.
LOGIT_TOL = 0.03


def _same(got: set[str], want: set[str], got_is: str, want_is: str) -> None:
    """One line per direction naming the tensors at fault."""
    assert not want - got, f"{', '.join(sorted(want - got))}: {want_is} but not {got_is}"
    assert not got - want, f"{', '.join(sorted(got - want))}: {got_is} but not {want_is}"


def _library_has_amx() -> bool:
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def test_repack_rules_agree_with_ggml_supports_op():
    """repack_tensors() gives every tensor kind, type and row count the answer ggml's own supports_op gives
    for CPU_REPACK in this library (tests/ggml_repack_oracle.py). The rules mirror the x86 branch of
    ggml_repack_get_optimal_repack_type, and "repack" is only chosen on x86, so elsewhere nothing is compared."""
    from minicpmv.runtime.weight_buffers import system_features

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    kinds = [
        (f"blk.{i}.{k}.weight", (256, rows), qt)
        for i, qt in enumerate(
            (QT.Q4_0, QT.Q4_K, QT.IQ4_NL, QT.MXFP4, QT.Q2_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.F16, QT.F32)
        )
        for k, rows in (("attn_q", 256), ("attn_k", 1020), ("ffn_down", 8))
    ] + [
        ("token_embd.weight", (256, 664), QT.Q4_0),
        ("output.weight", (256, 664), QT.Q4_0),
        ("output.weight", (256, 151748), QT.Q4_K),
        ("output_norm.weight", (256,), QT.F32),
    ]
    features = system_features()
    taken = 0
    for t in kinds:
        ours, ggml_says = bool(repack_tensors([t], features)), bool(repack_tensors_by_ggml([t]))
        assert ours == ggml_says, (
            f"{t[0]} {t[2].name} ne={t[1]}: ggml's supports_op says {ggml_says}, repack_tensors() {ours}"
        )
        taken += ggml_says
    assert taken, "ggml would repack none of the sample tensors: the oracle says nothing"


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q4_0"])
def test_repack_by_name_is_ggml_own_choice(tiny_lm_gguf, qtype):
    """The AMX-safe placement ("repack") names exactly the weights ggml's CPU_REPACK would take, llama.cpp
    repacks exactly those, and the logits match plain CPU buffers ("none") within LOGIT_TOL.

    The oracle is ggml's own supports_op, asked through the C API the way llama.cpp's loader asks it
    (tests/ggml_repack_oracle.py), so it holds on AMX machines too. Where the library has no AMX, llama.cpp's
    own placement ("llama") is compared as well: same repacked set, same buffer sizes, bit-equal logits.
    Where it has AMX, that placement would use the crashing AMX buffers, so that part is not run there."""
    path = tiny_lm_gguf(qtype)
    named = set(repack_tensors_in(path))
    ggml_says = set(repack_tensors_by_ggml_in(path))
    assert ggml_says, f"{path.name}: ggml would repack no tensor, so this test checks nothing"
    _same(named, ggml_says, "named by repack_tensors_in()", "taken by CPU_REPACK per ggml's supports_op")

    ours, our_sizes, logged = _run(path, "repack")
    _same(logged, named, "logged by llama.cpp as repacked", "named by repack_tensors_in()")
    assert set(ours["repacked"]) == named and our_sizes.get("CPU_REPACK", 0) > 0, our_sizes
    plain, plain_sizes, plain_logged = _run(path, "none")
    assert "CPU_REPACK" not in plain_sizes and not plain_logged and plain["finite"], plain_sizes
    a, b = np.array(ours["logits"]), np.array(plain["logits"])
    rel = float(np.abs(a - b).max() / np.ptp(b))
    assert ours["finite"] and rel <= LOGIT_TOL, f"repack vs none logits differ by {rel:.4f} of their range"

    if not _library_has_amx():
        own, own_sizes, own_logged = _run(path, "llama")
        _same(logged, own_logged, "repacked by name", "repacked by llama.cpp's own placement")
        assert our_sizes == own_sizes, (our_sizes, own_sizes)
        assert ours["logits"] == own["logits"], "repack by name vs llama.cpp's own placement: logits differ"


def test_version_prints_the_system_report():
    r = subprocess.run(
        [sys.executable, "-m", "minicpmv.cli.run", "--version"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rows = dict(
        line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
        for line in r.stdout.splitlines()
    )
    for key in (
        "minicpmv",
        "llama-cpp-python",
        "torch",
        "gguf",
        "cpu",
        "cpu flags",
        "llama.cpp build",
        "weight buffers",
        "model load",
        "vision dtype auto",
        "threads",
    ):
        assert rows.get(key), f"--version lacks {key!r}:\n{r.stdout}"
    from minicpmv.runtime.weight_buffers import plan_for_this_machine

    assert rows["weight buffers"].startswith(plan_for_this_machine().mode + ":")
    from minicpmv.runtime.llama_load import LOAD_MAPPED, LOAD_MAPPED_DROPPED, LOAD_READ

    # Linux (CPU): mapped and pages dropped; macOS: mapped for Metal; elsewhere read
    expected = (
        LOAD_MAPPED_DROPPED
        if sys.platform.startswith("linux")
        else LOAD_MAPPED
        if sys.platform == "darwin"
        else LOAD_READ
    )
    assert rows["model load"] == expected
    assert "ms in f32" in rows["vision dtype auto"] and "ms in bf16" in rows["vision dtype auto"]
