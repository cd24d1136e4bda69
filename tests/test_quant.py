"""quant/: one-pass quantized GGUFs are byte-identical to llama.cpp's `llama_model_quantize` applied to
our own BF16 GGUF of the same checkpoint (types and data of every tensor), for every type, with and
without an importance matrix, including llama.cpp's row-size fallbacks and its refusals; the type
mixture of the real 8B layout equals llama.cpp's own choice. Plus the imatrix reader against the
file format, bad input, the size table, and a dequantization sanity check."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter, Keys, quants
from gguf import GGMLQuantizationType as Q

from minicpmv import quant
from minicpmv.convert.synthetic import make_checkpoint
from minicpmv.quant.policy import SPECS, use_more_bits

from .llama_quantize import quantize_model_with_llama_cpp
from .quant_helpers import assert_same_as_llama, bf16_gguf, matmul_widths, one_pass

ALL_TYPES = list(SPECS)
QUANTIZED = [n for n, s in SPECS.items() if s.quantized]
# llama-quantize refuses these without an importance matrix (tensor_requires_imatrix)
NEED_IMATRIX = ["IQ3_XS", "IQ3_XXS", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


# ------------------------------------------------------------------------------------------------
# helpers


def assert_both_refuse(ckpt: Path, bf16_gguf: Path, tmp: Path, type_name: str) -> None:
    """Without an importance matrix: llama_model_quantize fails, we refuse naming the type, write nothing."""
    with pytest.raises(RuntimeError):
        quantize_model_with_llama_cpp(bf16_gguf, tmp / "ref.gguf", type_name, nthread=2)
    with pytest.raises(ValueError, match=rf"{type_name} needs an importance matrix.*--imatrix"):
        one_pass(ckpt, tmp / "ours", type_name)
    assert not (tmp / "ref.gguf").exists() and not list((tmp / "ours").glob("*"))


def synthetic_imatrix(widths: dict[str, int], seed: int) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (sum of x^2 per column, count): what llama-imatrix accumulates (dense model: n_mat 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (name, n) in enumerate(sorted(widths.items())):
        count = 0.0 if i == 3 else float(rng.integers(50, 500))  # one tensor never saw input
        out[name] = ((rng.gamma(0.5, 2.0, n) * max(count, 1)).astype(np.float32), count)
    return out


def write_imatrix_gguf(path: Path, data: dict[str, tuple[np.ndarray, float]]) -> Path:
    """llama-imatrix's GGUF layout: general.type=imatrix, imatrix.* keys, <name>.in_sum2 [n_mat, n]
    and <name>.counts [n_mat, 1] (numpy order) F32, names sorted."""
    w = GGUFWriter(path, "unused")
    w.kv_data[0].pop(Keys.General.ARCHITECTURE)
    w.add_type("imatrix")
    w.add_array(Keys.IMatrix.DATASETS, ["calibration.txt"])
    w.add_uint32(Keys.IMatrix.CHUNK_COUNT, 42)
    w.add_uint32(Keys.IMatrix.CHUNK_SIZE, 512)
    for name in sorted(data):
        sums, count = data[name]
        w.add_tensor(f"{name}.in_sum2", sums.reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
        w.add_tensor(f"{name}.in_sum", np.zeros((1, sums.size), np.float32))  # newer files carry it; unused
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_imatrix_dat(path: Path, data: dict[str, tuple[np.ndarray, int]]) -> Path:
    """llama-imatrix's legacy .dat: n_entries, then (name, ncall, nval, values * ncall), trailer."""
    b = bytearray(struct.pack("<i", len(data)))
    for name in sorted(data):
        vals, ncall = data[name]
        enc = name.encode()
        b += struct.pack("<i", len(enc)) + enc + struct.pack("<ii", ncall, vals.size)
        b += np.asarray(vals, "<f4").tobytes()
    b += struct.pack("<i", 10) + struct.pack("<i", 8) + b"data.txt"
    path.write_bytes(bytes(b))
    return path


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tiny_bf16(tiny_lm_gguf) -> Path:
    return tiny_lm_gguf("BF16")


@pytest.fixture(scope="session")
def medium(tmp_path_factory) -> tuple[Path, Path]:
    """8 layers: use_more_bits picks layers 0, 3, 6, 7 and not the others."""
    root = tmp_path_factory.mktemp("quant-medium")
    ckpt = make_checkpoint(root / "ckpt", "medium")
    return ckpt, bf16_gguf(ckpt, root / "bf16")


@pytest.fixture(scope="session")
def odd_width(tmp_path_factory) -> tuple[Path, Path]:
    """hidden 288 (a multiple of 32, not of 256) and ffn 600 (not even a multiple of 32)."""
    root = tmp_path_factory.mktemp("quant-odd")
    ckpt = make_checkpoint(
        root / "ckpt",
        "tiny",
        hidden_size=288,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=72,
        intermediate_size=600,
    )
    return ckpt, bf16_gguf(ckpt, root / "bf16")


@pytest.fixture(scope="session")
def tiny_imatrix(tiny_bf16, tmp_path_factory) -> Path:
    return write_imatrix_gguf(
        tmp_path_factory.mktemp("imat") / "tiny.gguf", synthetic_imatrix(matmul_widths(tiny_bf16), seed=1)
    )


@pytest.fixture(scope="session")
def deep_gqa4(tmp_path_factory) -> tuple[Path, Path]:
    """16 narrow layers with n_head / n_head_kv = 4 (as the 8B model): the n_gqa >= 4 rules, and the
    layer-position rules (n/16, n/8, the middle three quarters) each pick some layers and not others."""
    root = tmp_path_factory.mktemp("quant-gqa4")
    ckpt = make_checkpoint(
        root / "ckpt", "tiny", num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=1, intermediate_size=256
    )
    return ckpt, bf16_gguf(ckpt, root / "bf16")


# ------------------------------------------------------------------------------------------------
# identity with llama_model_quantize


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_tiny_matches_llama_quantize(tiny_ckpt, tiny_bf16, tmp_path, type_name):
    """tiny's rows are multiples of 256: every type is used as such (no fallback)."""
    if type_name in NEED_IMATRIX:
        assert_both_refuse(tiny_ckpt, tiny_bf16, tmp_path, type_name)
        return
    types = assert_same_as_llama(tiny_ckpt, tiny_bf16, tmp_path, type_name)
    assert types["output_norm.weight"] == Q.F32 and types["blk.0.attn_q_norm.weight"] == Q.F32
    assert types["blk.1.attn_q.weight"] == SPECS[type_name].default


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_tiny_with_imatrix_matches_llama_quantize(tiny_ckpt, tiny_bf16, tiny_imatrix, tmp_path, type_name):
    types = assert_same_as_llama(tiny_ckpt, tiny_bf16, tmp_path, type_name, imatrix=tiny_imatrix)
    assert SPECS[type_name].default in set(types.values())


# the types whose rules look at n_gqa or at the layer position
GQA4_CASES = [
    ("Q2_K", False),
    ("Q3_K_M", False),
    ("IQ4_XS", False),
    ("IQ3_M", False),
    ("IQ3_XS", True),
    ("IQ3_XXS", True),
    ("IQ2_M", True),
    ("IQ1_S", True),
]


@pytest.mark.parametrize("type_name,with_imatrix", GQA4_CASES)
def test_gqa4_layers_match_llama_quantize(deep_gqa4, tmp_path, type_name, with_imatrix):
    ckpt, bf16 = deep_gqa4
    imat = (
        write_imatrix_gguf(tmp_path / "i.gguf", synthetic_imatrix(matmul_widths(bf16), seed=7))
        if with_imatrix
        else None
    )
    types = assert_same_as_llama(ckpt, bf16, tmp_path, type_name, imatrix=imat)
    v = [types[f"blk.{i}.attn_v.weight"] for i in range(16)]
    if type_name in ("Q2_K", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ1_S"):  # n_gqa >= 4: attn_v -> Q4_K
        assert v == [Q.Q4_K] * 16
    if type_name == "Q3_K_M":  # the first two attn_v Q5_K; ffn_down Q5_K below n/16 = 1
        assert v == [Q.Q5_K] * 2 + [Q.Q4_K] * 14
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [Q.Q5_K, Q.Q4_K, Q.Q4_K]
    if type_name == "IQ3_XS":  # ffn_up/gate IQ3_XXS for 2 <= layer < 14
        up = [types[f"blk.{i}.ffn_up.weight"] == Q.IQ3_XXS for i in range(16)]
        assert up == [False] * 2 + [True] * 12 + [False] * 2


def test_36_layers_match_llama_quantize(tmp_path):
    """The real depth: llama.cpp orders blk.10 after blk.9 (numeric), and use_more_bits(i, 36) is
    {0-3, 6, 9, ..., 27, 30-35}. Narrow matrices keep it fast."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", num_hidden_layers=36)
    types = assert_same_as_llama(ckpt, bf16_gguf(ckpt, tmp_path / "bf16"), tmp_path, "Q4_K_M")
    q6 = [i for i in range(36) if types[f"blk.{i}.ffn_down.weight"] == Q.Q6_K]
    assert q6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35]
    assert q6 == [i for i in range(36) if types[f"blk.{i}.attn_v.weight"] == Q.Q6_K]


@pytest.mark.parametrize("type_name", ["Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
def test_medium_matches_llama_quantize(medium, tmp_path, type_name):
    ckpt, bf16 = medium
    types = assert_same_as_llama(ckpt, bf16, tmp_path, type_name)
    # the mixture itself, written out (independent of the oracle)
    more = {i for i in range(8) if use_more_bits(i, 8)}
    assert more == {0, 3, 6, 7}
    default = quant.parse_type(type_name).default
    for i in range(8):
        v, d = types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down.weight"]
        if type_name in ("Q4_K_M", "Q5_K_M"):
            assert (v, d) == ((Q.Q6_K, Q.Q6_K) if i in more else (default, default)), i
        elif type_name == "Q4_K_S":
            assert v == (Q.Q5_K if i < 4 else Q.Q4_K) and d == (Q.Q5_K if i < 1 else Q.Q4_K), i
        assert types[f"blk.{i}.attn_q.weight"] == default
    assert types["output.weight"] == (Q.Q8_0 if type_name == "Q8_0" else Q.Q6_K)
    assert types["token_embd.weight"] == default


def test_tied_embeddings_take_the_output_rule():
    spec = quant.parse_type("Q4_K_M")
    tensors = [("token_embd.weight", (600, 256)), ("blk.0.attn_v.weight", (128, 256))]
    assert quant.lm_tensor_types(tensors, spec, 1, n_gqa=2)[0] == Q.Q6_K
    untied = tensors + [("output.weight", (600, 256))]
    assert quant.lm_tensor_types(untied, spec, 1, n_gqa=2)[0] == Q.Q4_K


def test_row_size_fallbacks_match_llama_quantize(odd_width, tmp_path):
    ckpt, bf16 = odd_width
    expect = {  # type -> (288-wide matmuls, output.weight, 600-wide ffn_down)
        "Q4_K_M": (Q.Q5_0, Q.Q8_0, Q.F16),
        "Q5_K_S": (Q.Q5_1, Q.Q8_0, Q.F16),
        "Q6_K": (Q.Q8_0, Q.Q8_0, Q.F16),
        "Q4_0": (Q.Q4_0, Q.Q8_0, Q.F16),  # output: Q6_K -> Q8_0 fallback
        "Q8_0": (Q.Q8_0, Q.Q8_0, Q.F16),
        "Q3_K_S": (Q.Q4_0, Q.Q8_0, Q.F16),
        "IQ4_XS": (Q.IQ4_NL, Q.Q8_0, Q.F16),
        "IQ3_S": (Q.IQ4_NL, Q.Q8_0, Q.F16),
        # every IQ2_XXS tensor falls back to a type that needs no imatrix: llama.cpp accepts it without one
        "IQ2_XXS": (Q.IQ4_NL, Q.Q8_0, Q.F16),
    }
    for type_name, (mat, out, down) in expect.items():
        types = assert_same_as_llama(ckpt, bf16, tmp_path / type_name, type_name)
        assert types["blk.1.attn_q.weight"] == mat and types["blk.1.ffn_gate.weight"] == mat
        assert types["output.weight"] == out and types["blk.0.ffn_down.weight"] == down
    imat = write_imatrix_gguf(tmp_path / "i.gguf", synthetic_imatrix(matmul_widths(bf16), seed=8))
    types = assert_same_as_llama(ckpt, bf16, tmp_path / "IQ1_M", "IQ1_M", imatrix=imat)
    assert types["token_embd.weight"] == Q.Q4_0  # Q2_K -> Q4_0


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q4_0"])
def test_medium_with_gguf_imatrix_matches_llama_quantize(medium, tmp_path, type_name):
    ckpt, bf16 = medium
    imat = write_imatrix_gguf(tmp_path / "imatrix.gguf", synthetic_imatrix(matmul_widths(bf16), seed=1))
    types = assert_same_as_llama(ckpt, bf16, tmp_path, type_name, imatrix=imat)
    if type_name == "Q4_0":  # llama.cpp: with an imatrix, Q4_0 gives ffn_down of layer < n/8 Q4_1
        assert types["blk.0.ffn_down.weight"] == Q.Q4_1 and types["blk.1.ffn_down.weight"] == Q.Q4_0


def test_tiny_with_legacy_imatrix_matches_llama_quantize(tiny_ckpt, tiny_bf16, tmp_path):
    widths = matmul_widths(tiny_bf16)
    rng = np.random.default_rng(2)
    dat = write_imatrix_dat(
        tmp_path / "imatrix.dat", {n: ((rng.gamma(0.5, 2.0, w) * 7).astype(np.float32), 7) for n, w in widths.items()}
    )
    assert_same_as_llama(tiny_ckpt, tiny_bf16, tmp_path, "Q4_K_S", imatrix=dat)


# ------------------------------------------------------------------------------------------------
# type choice on the real layout (no weights): llama.cpp's own selection code as the oracle


def _layouts():
    from minicpmv.convert.lm_plan import published_lm_layout

    cfg, real = published_lm_layout()
    t = cfg.text
    yield (
        "8B",
        real,
        dict(
            n_embd=t.hidden_size,
            n_ff=t.intermediate_size,
            n_layer=t.num_hidden_layers,
            n_head=t.num_attention_heads,
            n_head_kv=t.num_key_value_heads,
            head_dim=t.head_dim,
        ),
    )
    # the same 36 layers with n_gqa 2 and 288-wide rows (fallbacks), and with tied embeddings
    odd = [(n, tuple(288 if d == 4096 else 576 if d == 1024 else d for d in shape)) for n, shape in real]
    yield "gqa2-odd", odd, dict(n_embd=288, n_ff=12288, n_layer=36, n_head=8, n_head_kv=4, head_dim=36)
    tied = [(n, s) for n, s in real if n != "output.weight"]
    yield (
        "tied",
        tied,
        dict(
            n_embd=t.hidden_size,
            n_ff=t.intermediate_size,
            n_layer=t.num_hidden_layers,
            n_head=t.num_attention_heads,
            n_head_kv=t.num_key_value_heads,
            head_dim=t.head_dim,
        ),
    )


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_types_equal_llama_cpp_selection(type_name):
    """llama_quant_compute_types (llama.cpp's selection, as if without an imatrix) on the 8B model's
    399 tensors, on a 36-layer variant with n_gqa 2 and rows that need fallbacks, and with tied
    embeddings; inputs BF16 as our two-step file."""
    from .llama_quant_types import llama_types

    spec = SPECS[type_name]
    for label, tensors, hp in _layouts():
        ref = llama_types(tensors, int(spec.ftype), input_type=int(Q.BF16), **hp)
        ours = quant.lm_tensor_types(
            tensors, spec, hp["n_layer"], n_gqa=hp["n_head"] // hp["n_head_kv"], input_type=Q.BF16
        )
        diff = [(n, Q(a).name, b.name) for (n, _), a, b in zip(tensors, ref, ours) if a != b]
        assert not diff, f"{type_name} on {label}: (tensor, llama.cpp, ours) {diff[:4]} ({len(diff)} differ)"


def test_size_table_is_computed_from_the_8b_layout():
    """--help and the README list every type with the 8B model's bits per weight and size, equal to
    the tensor bytes of the mixture llama.cpp picks on the published shapes (Q8_0: 34 bytes per 32
    weights; F16 2 bytes per weight; the norms stay F32)."""
    from minicpmv.cli.convert import quant_table
    from minicpmv.convert.lm_plan import published_lm_layout
    from minicpmv.quant.sizes import mixture_size

    cfg, tensors = published_lm_layout()
    n = sum(int(np.prod(s)) for _, s in tensors)
    t = cfg.text  # embeddings + output, per layer q/k/v/o, gate/up/down, 2 norms, q/k norms; final norm
    H, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = 2 * q * H + 2 * kv * H + 3 * t.intermediate_size * H + 2 * H + 2 * t.head_dim
    assert n == 2 * t.vocab_size * H + t.num_hidden_layers * per_layer + H == 8_189_195_264
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = quant_table()
    for name, spec in SPECS.items():
        m = mixture_size(tensors, spec, 36, 4)
        assert m.n_params == n and m.needs_imatrix == (name in NEED_IMATRIX)
        line = f"| `{name}` | {m.bpw:.2f} | {m.nbytes / 1e9:.2f} GB | {'yes' if m.needs_imatrix else ''} |"
        assert line in readme, line
        assert f"{name:<8} {m.bpw:5.2f} bpw {m.nbytes / 1e9:6.2f} GB" in table, name
    n_1d = sum(int(np.prod(s)) for _, s in tensors if len(s) == 1)  # norms stay F32
    assert mixture_size(tensors, SPECS["Q8_0"], 36, 4).nbytes == (n - n_1d) // 32 * 34 + 4 * n_1d
    assert mixture_size(tensors, SPECS["F16"], 36, 4).nbytes == 2 * (n - n_1d) + 4 * n_1d


def test_cli_refuses_a_type_that_needs_an_imatrix(tiny_ckpt, tmp_path):
    from .helpers import one_error_line, run_cli

    out = tmp_path / "out"
    res = run_cli("minicpm-convert", tiny_ckpt, "-o", out, "--quant", "iq2_xxs", "--quiet")
    one_error_line(res, "IQ2_XXS needs an importance matrix", "--imatrix")
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------
# importance matrix reader


def test_imatrix_reader_follows_the_file_formats(tmp_path):
    widths = {
        "blk.0.attn_q.weight": 256,
        "blk.0.ffn_down.weight": 512,
        "blk.1.attn_k.weight": 256,
        "blk.1.attn_v.weight": 256,
        "output.weight": 256,
    }
    data = synthetic_imatrix(widths, seed=3)
    got = quant.load_imatrix(write_imatrix_gguf(tmp_path / "i.gguf", data), list(widths))
    assert sorted(got) == sorted(widths)
    for name, (sums, count) in data.items():
        want = sums / np.float32(count) if count > 0 else np.ones_like(sums)
        assert got[name].dtype == np.float32 and np.array_equal(got[name], want), name
    assert (got[sorted(widths)[3]] == 1).all()  # count 0 -> neutral weights
    meta = quant.imatrix_metadata(tmp_path / "i.gguf")
    assert meta["quantize.imatrix.dataset"] == "calibration.txt" and meta["quantize.imatrix.chunks_count"] == 42

    legacy = {n: (sums, 5) for n, (sums, _) in data.items()}
    got = quant.load_imatrix(write_imatrix_dat(tmp_path / "i.dat", legacy), list(widths))
    for name, (vals, ncall) in legacy.items():
        assert np.array_equal(got[name], vals / np.float32(ncall)), name
    meta = quant.imatrix_metadata(tmp_path / "i.dat")
    assert meta["quantize.imatrix.dataset"] == "data.txt" and meta["quantize.imatrix.chunks_count"] == 10
    assert meta["quantize.imatrix.entries_count"] == len(widths)


def test_imatrix_missing_tensor_is_named(tiny_ckpt, tiny_bf16, tmp_path):
    data = synthetic_imatrix(matmul_widths(tiny_bf16), seed=4)
    del data["blk.1.ffn_up.weight"]
    imat = write_imatrix_gguf(tmp_path / "short.gguf", data)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
        one_pass(tiny_ckpt, tmp_path / "out", "Q4_K_M", imatrix=imat)
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_imatrix_of_another_model_is_rejected(tmp_path):
    imat = write_imatrix_gguf(tmp_path / "i.gguf", synthetic_imatrix({"blk.0.attn_q.weight": 128}, seed=5))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight"):
        quant.load_imatrix(imat, ["blk.0.attn_q.weight"], shapes={"blk.0.attn_q.weight": (256, 256)})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="junk.gguf"):
        quant.load_imatrix(junk, ["blk.0.attn_q.weight"])


# ------------------------------------------------------------------------------------------------
# types, encoder


def test_unknown_type_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        quant.parse_type("Q4_K_X")
    for name in ALL_TYPES:
        assert name in str(e.value)
    assert quant.parse_type("q4_k").name == "Q4_K_M"


def test_encoder_is_ggml_and_dequantizes_close_to_input():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((96, 512)).astype(np.float32)
    for t, tol in ((Q.Q4_K, 0.12), (Q.Q5_K, 0.06), (Q.Q6_K, 0.03), (Q.Q8_0, 0.01), (Q.Q4_0, 0.15)):
        y = quant.encode(x, t, None, n_threads=1)
        block, size = GGML_QUANT_SIZES[t]
        assert y.dtype == np.uint8 and y.shape == (96, 512 // block * size)
        back = quants.dequantize(y, t).reshape(x.shape)
        rel = np.sqrt(((back - x) ** 2).mean() / (x**2).mean())
        assert rel < tol, (t.name, rel)
        # threads split rows only: same bytes
        assert np.array_equal(quant.encode(x, t, None, n_threads=3), y)
    # Q8_0 / Q4_0 against gguf-py's independent numpy quantizers
    for t in (Q.Q8_0, Q.Q4_0):
        assert np.array_equal(quant.encode(x, t), quants.quantize(x, t).view(np.uint8).reshape(96, -1))
    assert np.array_equal(quant.encode(x, Q.F16).view(np.float16), x.astype(np.float16))
    # 16-bit inputs are widened inside the workers: same bytes as from float32
    bits = quants.quantize(x, Q.BF16).view(np.uint16)
    for t in (Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32):
        assert np.array_equal(
            quant.encode(bits, t, src_type=Q.BF16, n_threads=2),
            quant.encode(quants.dequantize(bits.view(np.uint8), Q.BF16), t, n_threads=2),
        ), t.name
    assert np.array_equal(quant.encode(bits, Q.BF16, src_type=Q.BF16).view(np.uint16), bits)
    h = x.astype(np.float16)
    assert np.array_equal(quant.encode(h, Q.Q5_K), quant.encode(h.astype(np.float32), Q.Q5_K))
    # the importance matrix reaches the kernel
    w = rng.random(512).astype(np.float32)
    assert not np.array_equal(quant.encode(x, Q.Q4_K, w), quant.encode(x, Q.Q4_K))
    with pytest.raises(ValueError, match="block size"):
        quant.encode(x[:, :288], Q.Q4_K)
    bad = x.copy()
    bad[5, 7] = np.nan
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*validation"):
        quant.encode(bad, Q.F16, name="blk.0.attn_q.weight")
