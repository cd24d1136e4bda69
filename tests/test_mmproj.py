"""mmproj converter: llama.cpp's mtmd loads our files and reproduces the reference vision math.

Oracles: llama.cpp's mtmd (via llama-cpp-python) for loading, tokenization and encoding, and
tests/reference_vision.py (an independent torch implementation of the reference model) for the
numbers. Images are chosen so mtmd and the reference see the same pixels (see tests/mtmd_slicing.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT
from PIL import Image

from minicpmv.convert.checkpoint import Checkpoint
from minicpmv.convert.config import CheckpointError
from minicpmv.convert.mmproj_plan import parse_mmproj_type
from minicpmv.convert.pipeline import convert
from minicpmv.runtime.llama_backend import recent_log

from .mtmd import IMAGE, TEXT, Mtmd
from .mtmd_slicing import mtmd_plan, mtmd_preprocess
from .reference_vision import ReferenceVision, navit_bucket_coords, pos_embed_2d, to_pixels

TYPES = ["f32", "f16", "bf16", "q8_0"]
# max |mtmd - reference| over every chunk (embedding values reach ~3.5). Measured on the tiny
# checkpoint: f32 3.0e-4 (ggml's im2col runs in f16), f16 1.4e-3, bf16 1.3e-2, q8_0 7.0e-2 (ggml
# also rounds the activations to bf16 / q8_0 inside those matmuls). Min cosine per row measured:
# 0.9999999, 0.9999998, 0.9999956, 0.99981.
BOUND = {"f32": 1e-3, "f16": 5e-3, "bf16": 3e-2, "q8_0": 0.15}
MIN_COS = {"f32": 0.999999, "f16": 0.99999, "bf16": 0.9995, "q8_0": 0.998}
# images whose slices mtmd cuts without resampling (refined image == input), plus one it letterboxes
SIZES = [(448, 448), (756, 518), (896, 448), (1000, 700)]


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # torch on one thread: the machine is shared


def make_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB image (low-res noise upsampled) plus pixel noise, uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed + 7919 * w + h)
    base = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    img += rng.integers(-20, 21, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def floor_buckets(n: int, buckets: int = 70) -> torch.Tensor:
    """llama.cpp's clip position rule: floor(70*i/n) in double precision."""
    return torch.tensor([math.floor(buckets * i / n) for i in range(n)])


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> ReferenceVision:
    return ReferenceVision(tiny_ckpt, dtype=torch.float64)


@pytest.fixture(scope="module")
def ref_out(ref):
    """Reference embeddings [n_chunks, 64, D] of every SIZES image, on the pixels mtmd encodes."""
    return {s: ref.embed([to_pixels(x) for x in mtmd_preprocess(make_image(*s))]).numpy() for s in SIZES}


@pytest.fixture(scope="module")
def lm(tiny_lm_gguf) -> Path:
    return tiny_lm_gguf("F32")


def read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(path))


# ----------------------------------------------------------------------------------------------
# type names, metadata, tensors


def test_parse_mmproj_type(tiny_ckpt, tmp_path):
    assert [parse_mmproj_type(t) for t in ("F16", "f32", "BF16", "Q8_0")] == ["f16", "f32", "bf16", "q8_0"]
    with pytest.raises(ValueError, match="f16, f32, bf16, q8_0"):
        parse_mmproj_type("q4_k")
    from typer.testing import CliRunner

    from minicpmv.cli.convert import app

    res = CliRunner().invoke(app, [str(tiny_ckpt), "-o", str(tmp_path / "o"), "--no-lm", "--mmproj-type", "q4_k"])
    assert res.exit_code == 2 and "--mmproj-type" in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mtype", TYPES)
def test_metadata_keys_and_value_types(tiny_mmproj_gguf, tiny_ckpt, mtype):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    vc = cfg["vision_config"]
    ftype = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[mtype]
    want = {  # docs/llamacpp.md §2.2: key -> (GGUF value types, value)
        "general.architecture": ([VT.STRING], "clip"),
        "general.type": ([VT.STRING], "mmproj"),
        "general.file_type": ([VT.UINT32], ftype),
        "clip.projector_type": ([VT.STRING], "resampler"),
        "clip.has_vision_encoder": ([VT.BOOL], True),
        "clip.has_text_encoder": ([VT.BOOL], False),
        "clip.has_minicpmv_projector": ([VT.BOOL], True),
        "clip.minicpmv_version": ([VT.INT32], 6),
        "clip.minicpmv_query_num": ([VT.UINT32], 64),
        "clip.vision.image_size": ([VT.UINT32], 448),
        "clip.vision.patch_size": ([VT.UINT32], 14),
        "clip.vision.embedding_length": ([VT.UINT32], vc["hidden_size"]),
        "clip.vision.feed_forward_length": ([VT.UINT32], vc["intermediate_size"]),
        "clip.vision.projection_dim": ([VT.UINT32], 0),
        "clip.vision.attention.head_count": ([VT.UINT32], vc["num_attention_heads"]),
        "clip.vision.attention.layer_norm_epsilon": ([VT.FLOAT32], np.float32(1e-6)),
        "clip.vision.block_count": ([VT.UINT32], vc["num_hidden_layers"]),
        "clip.vision.image_mean": ([VT.ARRAY, VT.FLOAT32], [0.5, 0.5, 0.5]),
        "clip.vision.image_std": ([VT.ARRAY, VT.FLOAT32], [0.5, 0.5, 0.5]),
        "clip.use_gelu": ([VT.BOOL], True),
        "minicpmv.vision.position_buckets": ([VT.UINT32], 70),
    }
    fields = read(tiny_mmproj_gguf(mtype)).fields
    for key, (types, value) in want.items():
        assert key in fields, key
        assert fields[key].types == types, (key, fields[key].types)
        got = fields[key].contents()
        assert (np.float32(got) == value) if types == [VT.FLOAT32] else got == value, (key, got)
    assert fields["general.name"].types == [VT.STRING] and fields["general.description"].types == [VT.STRING]
    # nothing else (e.g. clip.vision.image_grid_pinpoints would switch mtmd to llava-1.6 slicing)
    extra = {k for k in fields if not k.startswith("GGUF.")} - set(want) - {"general.name", "general.description"}
    assert not extra, extra


def expected_tensors(n_layer: int) -> list[str]:
    """Tensor names llama.cpp's clip loader reads for a `resampler` projector, spelled out
    (docs/llamacpp.md §2.3)."""
    v = ["v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", "v.post_ln.weight", "v.post_ln.bias"]
    for i in range(n_layer):
        for k in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            v += [f"v.blk.{i}.{k}.weight", f"v.blk.{i}.{k}.bias"]
    r = ["resampler.query", "resampler.kv.weight", "resampler.proj.weight", "resampler.pos_embed_k"]
    for k in ("q", "k", "v", "out"):
        r += [f"resampler.attn.{k}.weight", f"resampler.attn.{k}.bias"]
    for k in ("q", "kv", "post"):
        r += [f"resampler.ln_{k}.weight", f"resampler.ln_{k}.bias"]
    return v + r


@pytest.mark.parametrize("mtype", TYPES)
def test_tensor_inventory_shapes_and_types(tiny_mmproj_gguf, tiny_ckpt, mtype):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    Hv, Iv, D = cfg["vision_config"]["hidden_size"], cfg["vision_config"]["intermediate_size"], cfg["hidden_size"]
    tensors = {t.name: t for t in read(tiny_mmproj_gguf(mtype)).tensors}
    assert sorted(tensors) == sorted(expected_tensors(cfg["vision_config"]["num_hidden_layers"]))
    ne = {n: [int(x) for x in t.shape] for n, t in tensors.items()}  # ggml order
    assert ne["v.patch_embd.weight"] == [14, 14, 3, Hv]
    assert ne["v.position_embd.weight"] == [Hv, 4900]
    assert ne["v.blk.0.ffn_up.weight"] == [Hv, Iv] and ne["v.blk.0.ffn_down.weight"] == [Iv, Hv]  # fc1 = up
    assert ne["resampler.query"] == [D, 64] and ne["resampler.kv.weight"] == [Hv, D]
    assert ne["resampler.proj.weight"] == [D, D] and ne["resampler.pos_embed_k"] == [D, 4900]

    matrix = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[mtype]
    for name, t in tensors.items():
        if len(ne[name]) == 1 or name in ("resampler.query", "resampler.pos_embed_k"):
            want = Q.F32  # ggml_add/ggml_norm take them with an F32 activation
        elif name in ("v.patch_embd.weight", "v.position_embd.weight"):
            want = Q.F16 if mtype == "q8_0" else matrix  # im2col / get_rows: never block-quantized
        elif mtype == "q8_0" and ne[name][0] % 32:
            want = Q.F16  # fc2's rows (200 here, 4304 in the real model) do not split into 32-blocks
        else:
            want = matrix
        assert t.tensor_type == want, (name, t.tensor_type.name, want.name)
    if mtype == "q8_0":
        assert tensors["v.blk.0.ffn_down.weight"].tensor_type == Q.F16


def _values(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for t in read(path).tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out


def test_tensor_values_and_transforms(tiny_mmproj_gguf, tiny_ckpt):
    ck = Checkpoint(tiny_ckpt)
    D = ck.shape("resampler.proj")[0]
    f32 = _values(tiny_mmproj_gguf("f32"))
    eq = np.testing.assert_array_equal
    eq(f32["v.patch_embd.weight"], ck.f32("vpm.embeddings.patch_embedding.weight"))
    eq(f32["v.position_embd.weight"], ck.f32("vpm.embeddings.position_embedding.weight"))
    eq(f32["v.blk.1.ffn_up.weight"], ck.f32("vpm.encoder.layers.1.mlp.fc1.weight"))
    eq(f32["v.blk.1.ffn_down.bias"], ck.f32("vpm.encoder.layers.1.mlp.fc2.bias"))
    eq(f32["v.blk.0.attn_out.weight"], ck.f32("vpm.encoder.layers.0.self_attn.out_proj.weight"))
    eq(f32["resampler.query"], ck.f32("resampler.query"))
    eq(f32["resampler.kv.weight"], ck.f32("resampler.kv_proj.weight"))
    w, b = ck.f32("resampler.attn.in_proj_weight"), ck.f32("resampler.attn.in_proj_bias")
    for j, k in enumerate("qkv"):
        eq(f32[f"resampler.attn.{k}.weight"], w[j * D : (j + 1) * D])
        eq(f32[f"resampler.attn.{k}.bias"], b[j * D : (j + 1) * D])
    eq(f32["resampler.proj.weight"], ck.f32("resampler.proj").T)
    eq(f32["resampler.pos_embed_k"], pos_embed_2d(D, 70, 70).reshape(4900, D))

    # other types: the same values, rounded as the type rounds them
    for mtype in ("f16", "bf16", "q8_0"):
        vals = _values(tiny_mmproj_gguf(mtype))
        for name, x in f32.items():
            y = vals[name]
            if mtype == "bf16":  # the checkpoint is bf16: lossless
                eq(y, x)
            elif mtype == "f16" or y.shape[-1] % 32 or x.ndim != 2:
                np.testing.assert_allclose(y, x, rtol=2**-11, atol=2**-24, err_msg=name)
            else:  # q8_0: error within half a step of each 32-block's scale
                blocks = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                # q = round(x/d), d = amax/127 stored as f16
                assert np.all(np.abs((y - x).reshape(-1, 32)) <= blocks * (0.5 + 127 * 2**-11) + 1e-7), name


# ----------------------------------------------------------------------------------------------
# mtmd: loading, token layout, embeddings


def expected_layout(w: int, h: int) -> list[str]:
    cols, rows = mtmd_plan(w, h).grid
    seq = ["<image>", "IMG64", "</image>"]
    for r in range(rows):
        for _ in range(cols):
            seq += ["<slice>", "IMG64", "</slice>"]
        if r < rows - 1:
            seq.append("\n")
    return seq


@pytest.mark.parametrize("size", [(1000, 700), (448, 448), (1344, 1344)])
def test_token_layout(tiny_mmproj_gguf, lm, size):
    w, h = size
    with Mtmd.open(tiny_mmproj_gguf("f16"), lm) as mt, mt.tokenize([make_image(w, h)]) as chunks:
        seq = []
        for c in chunks:
            if c.kind == TEXT:
                seq += [mt.lm.detokenize([t]) for t in c.tokens]
            else:
                assert c.kind == IMAGE and (c.nx, c.ny) == (64, 1)
                seq.append(f"IMG{c.n_tokens}")
    assert seq == expected_layout(w, h)
    if size == (1000, 700):
        assert mtmd_plan(w, h).grid == (2, 2)  # the slicing case of the issue: 4 slices, 2 rows


def test_embedding_width_checked_by_mtmd(tiny_mmproj_gguf, lm, tmp_path):
    import llama_cpp

    with Mtmd.open(tiny_mmproj_gguf("f16"), lm, vocab_only=False) as mt:  # full LM: mtmd compares widths
        assert llama_cpp.llama_model_n_embd_inp(mt.lm.model) == mt.n_embd == 256
        (emb,) = mt.encode_image(make_image(448, 448))
        assert emb.shape == (64, 256) and np.isfinite(emb).all()
    # an mmproj from a checkpoint whose LM is 128 wide is refused next to the 256-wide LM
    from minicpmv.convert.synthetic import make_checkpoint

    other = make_checkpoint(
        tmp_path / "narrow",
        "tiny",
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
    )
    narrow = convert(other, tmp_path / "out", quant_type="F32", write_lm=False, progress=False).mmproj_path
    with pytest.raises(RuntimeError, match="mtmd could not load"):
        Mtmd.open(narrow, lm, vocab_only=False)
    assert "mismatch between text model (n_embd = 256) and mmproj (n_embd = 128)" in recent_log(200)


@pytest.mark.parametrize("mtype", TYPES)
def test_mtmd_embeddings_match_reference(tiny_mmproj_gguf, lm, ref_out, mtype):
    worst, worst_cos = 0.0, 1.0
    with Mtmd.open(tiny_mmproj_gguf(mtype), lm) as mt:
        for size in SIZES:
            got = mt.encode_image(make_image(*size))
            want = ref_out[size]
            cols, rows = mtmd_plan(*size).grid
            assert len(got) == len(want) == 1 + cols * rows
            for g, r in zip(got, want):
                assert g.shape == r.shape == (64, 256)
                worst = max(worst, float(np.abs(g - r).max()))
                worst_cos = min(
                    worst_cos, float(np.min(np.sum(g * r, 1) / np.linalg.norm(g, axis=1) / np.linalg.norm(r, axis=1)))
                )
    print(f"{mtype}: max |mtmd - reference| = {worst:.3g}, min cosine = {worst_cos:.7f}")
    assert worst < BOUND[mtype] and worst_cos > MIN_COS[mtype]


def test_compared_images_need_no_slice_resampling():
    """Except the letterboxed 1000x700 (emulated in mtmd_preprocess), the compared images are cut into
    slices without any resize, and every patch grid side avoids the bucketing mismatches."""
    for w, h in SIZES:
        plan = mtmd_plan(w, h)
        if (w, h) != (1000, 700) and plan.grid != (0, 0):
            assert plan.refined == (w, h)
        sides = {plan.overview[0] // 14, plan.overview[1] // 14}
        if plan.slice:
            sides |= {plan.slice[0] // 14, plan.slice[1] // 14}
        for n in sides:
            assert torch.equal(navit_bucket_coords(n), floor_buckets(n)), n


# ----------------------------------------------------------------------------------------------
# documented differences between mtmd and the reference

# docs/pitfalls.md §1: sides where the reference's float32 bucketize is one lower than floor(70*i/n)
BUCKET_DIFFS = {25: [5, 10, 15, 20], 49: [7, 14, 35, 42], 50: [5, 10, 15, 20, 30, 40], 55: [11, 22, 33, 44]}


@pytest.mark.parametrize("n", sorted(BUCKET_DIFFS))
def test_position_buckets_differ_from_llama_cpp(n):
    ref, cpp = navit_bucket_coords(n), floor_buckets(n)
    diff = torch.nonzero(ref != cpp).flatten().tolist()
    assert diff == BUCKET_DIFFS[n]
    assert torch.all(cpp[diff] - ref[diff] == 1)


def test_mtmd_position_buckets_differ_end_to_end(tiny_mmproj_gguf, lm, ref, tiny_ckpt):
    """700x560 is cut into two 25x40-patch slices: mtmd (floor) disagrees with the reference there,
    and agrees once the reference uses floor(70*i/n); the overview (36x29 patches) agrees."""
    img = make_image(700, 560)
    assert mtmd_plan(700, 560).slice == (350, 560)
    px = [to_pixels(x) for x in mtmd_preprocess(img)]
    navit = ref.embed(px).numpy()
    floor = ReferenceVision(tiny_ckpt, dtype=torch.float64, bucket_coords=floor_buckets).embed(px).numpy()
    with Mtmd.open(tiny_mmproj_gguf("f32"), lm) as mt:
        got = mt.encode_image(img)
    assert np.abs(got[0] - navit[0]).max() < BOUND["f32"]
    for g, a, b in zip(got[1:], navit[1:], floor[1:]):
        assert np.abs(g - b).max() < BOUND["f32"]
        assert np.abs(g - a).max() > 50 * BOUND["f32"]


def test_mtmd_letterboxes_slices_the_reference_stretches(tiny_mmproj_gguf, lm, ref, ref_out):
    """1000x700: mtmd resizes the refined 1064x756 image keeping the aspect and pads it black; the
    reference stretches it. Overviews agree; slices only agree with the letterboxed pixels."""
    w, h = 1000, 700
    img = make_image(w, h)
    plan = mtmd_plan(w, h)
    (tw, th), (sw, sh) = plan.refined, plan.slice
    stretched = np.asarray(Image.fromarray(img).resize((tw, th), Image.BICUBIC))
    hf_slices = [stretched[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw] for r in range(2) for c in range(2)]
    hf = ref.embed([to_pixels(x) for x in hf_slices]).numpy()
    with Mtmd.open(tiny_mmproj_gguf("f32"), lm) as mt:
        got = mt.encode_image(img)
    assert np.abs(got[0] - ref_out[(w, h)][0]).max() < BOUND["f32"]
    for g, letterboxed, stretched_ in zip(got[1:], ref_out[(w, h)][1:], hf):
        assert np.abs(g - letterboxed).max() < BOUND["f32"]
        assert np.abs(g - stretched_).max() > 50 * BOUND["f32"]


# ----------------------------------------------------------------------------------------------
# bad input


def _variant(src: Path, dst: Path, **vision) -> Path:
    """The checkpoint's files (linked) with vision_config entries replaced in config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"] |= vision
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "override, tensor, have, want",
    [
        ({"intermediate_size": 256}, "vpm.encoder.layers.0.mlp.fc1.weight", (200, 96), (256, 96)),
        ({"hidden_size": 128}, "vpm.embeddings.patch_embedding.weight", (96, 3, 14, 14), (128, 3, 14, 14)),
    ],
)
def test_vision_config_disagreeing_with_tensors(tiny_ckpt, tmp_path, override, tensor, have, want):
    bad = _variant(tiny_ckpt, tmp_path / "bad", **override)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(bad, out, quant_type="F32", write_lm=False, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and tensor in msg and str(have) in msg and str(want) in msg
    assert not out.exists() or not any(out.iterdir())

    from typer.testing import CliRunner

    from minicpmv.cli.convert import app

    res = CliRunner().invoke(app, [str(bad), "-o", str(out), "--no-lm", "--quiet"])
    assert res.exit_code != 0 and tensor in res.output
    assert not out.exists() or not any(out.iterdir())


def test_unsupported_vision_geometry(tiny_ckpt):
    """Checkpoints llama.cpp's clip cannot run are refused with the reason (one line)."""
    import dataclasses

    from minicpmv.convert.config import load_config
    from minicpmv.convert.mmproj_plan import check_supported

    cfg = load_config(tiny_ckpt)
    check_supported(cfg, "config.json")
    v64 = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=896))  # 64 per side
    with pytest.raises(CheckpointError, match="64 position buckets per side; llama.cpp's clip requires 70"):
        check_supported(v64, "config.json")
    t = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=320))
    with pytest.raises(CheckpointError, match="hidden_size 320 is not a multiple of 128"):
        check_supported(t, "config.json")


# ----------------------------------------------------------------------------------------------
# the oracle itself: padding/masking and temporal grouping against simpler formulations


def test_reference_batching_and_temporal_groups(ref):
    """Batched slices of different sizes (padding + masks) equal one-by-one runs; a temporal group
    equals torch's own nn.MultiheadAttention over the group's unpadded keys concatenated."""
    from .reference_vision import temporal_embed

    rng = np.random.default_rng(1)
    px = [rng.uniform(-1, 1, (3, 14 * h, 14 * w)).astype(np.float32) for h, w in ((3, 5), (4, 4), (2, 3))]
    sizes = [(3, 5), (4, 4), (2, 3)]
    with torch.no_grad():
        feats = ref.vision(px)
        for f, x in zip(feats, px):
            torch.testing.assert_close(f, ref.vision([x])[0], rtol=0, atol=1e-12)
        single = ref.resample(feats, sizes, None)
        for i in range(3):
            torch.testing.assert_close(single[i], ref.resample([feats[i]], [sizes[i]])[0], rtol=0, atol=1e-12)
        grouped = ref.resample(feats, sizes, [[-1], [3, 7]])

        W, D = ref.w, ref.embed_dim
        mha = torch.nn.MultiheadAttention(D, D // 128, dtype=torch.float64)
        mha.in_proj_weight.copy_(W["resampler.attn.in_proj_weight"])
        mha.in_proj_bias.copy_(W["resampler.attn.in_proj_bias"])
        mha.out_proj.weight.copy_(W["resampler.attn.out_proj.weight"])
        mha.out_proj.bias.copy_(W["resampler.attn.out_proj.bias"])

        def ln(x, n):
            return torch.nn.functional.layer_norm(x, (D,), W[n + ".weight"], W[n + ".bias"], 1e-6)

        q = ln(W["resampler.query"], "resampler.ln_q")

        def manual(idx, tids):
            ks, vs = [], []
            for i, t in zip(idx, tids):
                h, w = sizes[i]
                v = ln(feats[i] @ W["resampler.kv_proj.weight"].T, "resampler.ln_kv")
                k = v + torch.from_numpy(pos_embed_2d(D, h, w).reshape(h * w, D)).double()
                if t >= 0:
                    k = k + torch.from_numpy(temporal_embed(D, t)).double()
                ks.append(k)
                vs.append(v)
            out = mha(q[:, None], torch.cat(ks)[:, None], torch.cat(vs)[:, None])[0][:, 0]
            return ln(out, "resampler.ln_post") @ W["resampler.proj"]

        for i in range(3):
            torch.testing.assert_close(single[i], manual([i], [-1]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grouped[0], manual([0], [-1]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grouped[1], manual([1, 2], [3, 7]), rtol=1e-9, atol=1e-9)
