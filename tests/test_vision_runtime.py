"""Vision runtime (runtime/mmproj.py + runtime/vision.py) against two oracles:

- tests/reference_vision.py, an independent torch transcription of the reference model that reads
  the HF checkpoint (not the mmproj), run in float64;
- llama.cpp's mtmd on the same mmproj file, for inputs where mtmd and the reference agree.

Measured on the tiny checkpoint (embedding values reach ~4), max abs difference per slice:
f32 compute vs the float64 reference 3.5e-6 (f32, f16 and bf16 mmproj: all hold the bf16 checkpoint
values exactly), q8_0 mmproj 5.6e-2; bf16 compute 2.6e-2 (cosine 0.99998); mtmd on the f32 mmproj
2.1e-4 (its patch conv runs in f16), on the f16 mmproj 1.3e-3.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from minicpmv.cpu import default_threads
from minicpmv.runtime import compute_thread, vision_ops
from minicpmv.runtime.mmproj import MmprojError, load_mmproj
from minicpmv.runtime.vision import VisionEncoder, VisionInputError
from minicpmv.runtime.vision_ops import navit_position_ids, pos_embed_axes, temporal_embed
from minicpmv.schema import v_blk

from . import reference_vision as rv
from .reference_vision import ReferenceVision, to_pixels

F32_TOL = 1e-4  # f32 mmproj, f32 compute vs the float64 reference (max abs)
BF16_TOL, BF16_COS = 0.06, 0.9999  # bf16 compute (bf16 matmul inputs, f32 accumulation)
MTMD_TOL = 1e-3  # mtmd computes its patch conv in f16


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # torch on one thread: the machine is shared


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> ReferenceVision:
    return ReferenceVision(tiny_ckpt, dtype=torch.float64)


@pytest.fixture(scope="module")
def enc32(tiny_mmproj_gguf) -> VisionEncoder:
    return VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="f32", n_threads=1)


@pytest.fixture(scope="module")
def enc16(tiny_mmproj_gguf) -> VisionEncoder:
    return VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="bf16", n_threads=1)


def pixels(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Normalized [3, h, w] slices from random uint8 images (h, w in pixels)."""
    rng = np.random.default_rng(seed)
    return [to_pixels(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# (H, W) in pixels: the brief's shapes plus a tiny one; all run in ONE batch
MIXED = [(448, 448), (364, 546), (518, 392), (98, 70), (70, 98)]


# ----------------------------------------------------------------------------------------------
# images of different sizes in one batch


def test_mixed_sizes_one_batch_f32(enc32, ref):
    px = pixels(MIXED)
    want = ref.embed(px).numpy()
    got = enc32.encode_slices(px)
    assert got.shape == (len(MIXED), 64, ref.embed_dim) and got.dtype == np.float32
    err = np.abs(got - want).max(axis=(1, 2))
    assert err.max() < F32_TOL, err
    # one batch == each slice alone (padding and masks change nothing)
    alone = np.concatenate([enc32.encode_slices([p]) for p in px])
    assert np.abs(alone - got).max() < 1e-5


def test_tower_output_matches_reference(enc32, ref):
    px = pixels(MIXED[:3], seed=1)
    for ours, theirs in zip(enc32.vision(px), ref.vision(px)):
        assert ours.shape == tuple(theirs.shape)
        assert np.abs(ours - theirs.numpy()).max() < F32_TOL


def test_mixed_sizes_one_batch_bf16(enc16, ref):
    px = pixels(MIXED, seed=2)
    want = ref.embed(px).numpy()
    got = enc16.encode_slices(px)
    assert enc16.dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert np.abs(g - w).max() < BF16_TOL and cosine(g, w) > BF16_COS


def test_bf16_attention_head_groups_equal_per_head_attention():
    """The batched bf16 attention (a few heads per product, softmax in place in one scores buffer)
    gives what one head at a time with torch's own softmax gives, over packed slices of different
    lengths and a head count the group size does not divide: bit for bit here, up to bf16 rounding
    where another CPU's kernels sum the products in another order. The in-place softmax itself is
    exact on any CPU."""
    torch.manual_seed(0)
    nh, hd, lens = 5, 8, [7, 12, 3]
    N, d = sum(lens), nh * hd
    qkv = (torch.randn(N, 3 * d) * 2).bfloat16()
    got = vision_ops.attention_head_groups(qkv, lens, nh)
    assert vision_ops.HEADS_PER_PRODUCT < nh and nh % vision_ops.HEADS_PER_PRODUCT
    q, k, v = qkv.view(N, 3, nh, hd).unbind(1)
    want = torch.empty(N, nh, hd, dtype=torch.bfloat16)
    lo = 0
    for n in lens:
        for h in range(nh):
            rows = slice(lo, lo + n)
            p = torch.softmax(q[rows, h] @ k[rows, h].T, dim=-1)
            want[rows, h] = p @ v[rows, h]
        lo += n
    torch.testing.assert_close(got, want.view(N, d), rtol=1e-2, atol=1e-2)
    scores = (torch.randn(3, 12, 12) * 4).bfloat16()
    in_place = scores.clone()
    torch.ops.aten._softmax.out(in_place, -1, False, out=in_place)
    assert torch.equal(in_place, torch.softmax(scores, dim=-1))


def test_bf16_encode_makes_no_threads(tiny_mmproj_gguf, enc16, monkeypatch):
    """n_threads=2: bf16 attention runs on torch's intra-op threads of the compute thread and starts
    no thread of ours (compute_thread.py: live threads that ran torch slow llama.cpp); the same
    result as one thread, and the torch thread setting of the thread that encodes is left alone."""
    import threading

    enc = VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="bf16", n_threads=2)
    px = pixels(MIXED, seed=10)
    before = compute_thread.run(torch.get_num_threads)
    started = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or start(self))
    got = enc.encode_slices(px, [[-1], [-1], [-1], [3, 4]])
    assert started == []
    assert compute_thread.run(torch.get_num_threads) == before
    want = enc16.encode_slices(px, [[-1], [-1], [-1], [3, 4]])
    assert np.abs(got - want).max() < 1e-2


@pytest.mark.parametrize("mtype, tol", [("f16", F32_TOL), ("bf16", F32_TOL), ("q8_0", 0.15)])
def test_other_mmproj_types(tiny_mmproj_gguf, ref, mtype, tol):
    """f16/bf16 hold the bf16 checkpoint values exactly; q8_0 is a lossy 8-bit copy."""
    enc = VisionEncoder.load(tiny_mmproj_gguf(mtype), dtype="f32", n_threads=1)
    px = pixels(MIXED[:2], seed=3)
    got, want = enc.encode_slices(px), ref.embed(px).numpy()
    assert np.abs(got - want).max() < tol
    assert cosine(got, want) > (0.9995 if mtype == "q8_0" else 0.9999999)


def test_q8_0_dequantized_once_like_gguf_py(tiny_mmproj_gguf):
    path = tiny_mmproj_gguf("q8_0")
    mm = load_mmproj(path)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == v_blk("attn_q", 0) + ".weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    got = mm.get(t.name)
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(reversed(t.shape.tolist()))
    assert np.array_equal(got.numpy(), want)


# ----------------------------------------------------------------------------------------------
# video: temporal groups


def test_video_groups(enc32, ref):
    # groups of 1, 2, 3 and 6 frames; a -1 inside a group; frames of different sizes in one group
    sizes = [(448, 448)] + [(224, 224)] * 2 + [(224, 224), (168, 224), (224, 224)] + [(112, 140)] * 6
    tids = [[-1], [0, 5], [10, -1, 30], [40, 41, 42, 43, 44, 45]]
    px = pixels(sizes, seed=4)
    want = ref.embed(px, tids).numpy()
    got = enc32.encode_slices(px, tids)
    assert got.shape == (4, 64, ref.embed_dim)
    assert np.abs(got - want).max() < F32_TOL
    # temporal terms matter: dropping them changes the grouped outputs
    plain = enc32.encode_slices(px, [[-1], [-1, -1], [-1, -1, -1], [-1] * 6])
    assert np.abs(plain[1:] - got[1:]).max() > 1e-2 and np.abs(plain[0] - got[0]).max() < 1e-6


def test_video_groups_bf16_and_large_ids(enc16, ref):
    """Ids beyond the reference's initial 72000-row table (it grows on demand)."""
    px = pixels([(140, 140)] * 4, seed=5)
    tids = [[71999, 72000], [100000, 123456]]
    want = ref.embed(px, tids).numpy()
    got = enc16.encode_slices(px, tids)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() < BF16_TOL and cosine(g, w) > BF16_COS


def test_position_tables_equal_reference():
    """The resampler uses the 2-D table as its row and column halves (vision_ops.resample): put
    together, they are the reference's table bit for bit."""
    for h, w in [(32, 32), (26, 39), (80, 3)]:
        rows, cols = pos_embed_axes(h, w, 256)
        table = torch.cat([cols[None].expand(h, w, 128), rows[:, None].expand(h, w, 128)], dim=-1)
        assert np.array_equal(table.numpy(), rv.pos_embed_2d(256, h, w))
    ids = [0, 1, 9, 600, 71999, 80000]
    assert np.array_equal(temporal_embed(ids, 256).numpy(), np.stack([rv.temporal_embed(256, t) for t in ids]))


# ----------------------------------------------------------------------------------------------
# NaViT position buckets


def test_navit_buckets_follow_reference_not_floor():
    for n, lower_at in {
        25: [5, 10, 15, 20],
        49: [7, 14, 35, 42],
        50: [5, 10, 15, 20, 30, 40],
        55: [11, 22, 33, 44],
    }.items():
        ids = navit_position_ids(n, n, 70).view(n, n)
        rows, cols = ids[:, 0] // 70, ids[0, :] % 70
        assert torch.equal(rows, rv.navit_bucket_coords(n)) and torch.equal(cols, rows)
        floor = torch.tensor([70 * i // n for i in range(n)])
        assert (floor - rows).nonzero().flatten().tolist() == lower_at
        assert torch.all(floor[lower_at] - rows[lower_at] == 1)
    assert torch.equal(navit_position_ids(25, 32, 70), rv.navit_position_ids(25, 32))


def test_navit_buckets_end_to_end(enc32, ref, tiny_ckpt):
    """Slices with sides of 25/49/50/55 patches match the reference; the floor rule does not."""
    px = pixels([(25 * 14, 50 * 14), (49 * 14, 55 * 14)], seed=6)
    got = enc32.encode_slices(px)
    assert np.abs(got - ref.embed(px).numpy()).max() < F32_TOL
    floor_ref = ReferenceVision(tiny_ckpt, bucket_coords=lambda n, b: torch.tensor([b * i // n for i in range(n)]))
    assert np.abs(got - floor_ref.embed(px).numpy()).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# mtmd (llama.cpp) on the same file and pixels


def test_matches_mtmd(tiny_mmproj_gguf, tiny_lm_gguf, enc32):
    from .mtmd import Mtmd
    from .mtmd_slicing import mtmd_preprocess

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(448, 448), (448, 896)]]
    with Mtmd.open(tiny_mmproj_gguf("f32"), tiny_lm_gguf("F32")) as mt:
        theirs = [e for img in images for e in mt.encode_image(img)]
    # the pixels mtmd encodes (448x448 unchanged; 896x448 -> 448x224 overview + two 448x448 slices)
    px = [to_pixels(x) for img in images for x in mtmd_preprocess(img)]
    assert len(px) == len(theirs) == 4
    ours = enc32.encode_slices(px)  # all chunks of both images in one batch
    for o, t in zip(ours, theirs):
        assert np.abs(o - t).max() < MTMD_TOL and cosine(o, t) > 0.99999


# ----------------------------------------------------------------------------------------------
# llama.cpp's legacy layout (fc1 stored as ffn_down, no general.type)


def write_legacy(src, dst) -> None:
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "clip")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.type"):
            continue
        t = f.types
        if t[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), t[0], sub_type=t[-1])
        else:
            w.add_key_value(name, f.contents(), t[0])
    swap = {".ffn_up.": ".ffn_down.", ".ffn_down.": ".ffn_up."}
    for t in r.tensors:
        name = t.name
        for a, b in swap.items():
            if a in t.name:
                name = t.name.replace(a, b)
        w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_legacy_layout_gives_identical_embeddings(tiny_mmproj_gguf, tmp_path):
    ours_path = tiny_mmproj_gguf("f16")
    legacy_path = tmp_path / "mmproj-model-f16.gguf"
    write_legacy(ours_path, legacy_path)
    r = gguf.GGUFReader(str(legacy_path))
    assert r.get_field("general.type") is None
    n_embd = int(r.get_field("clip.vision.embedding_length").contents())
    down = next(t for t in r.tensors if t.name == v_blk("ffn_down", 0) + ".weight")
    assert int(down.shape[0]) == n_embd  # ggml ne[0] == hidden: fc1 stored as ffn_down

    a = VisionEncoder.load(ours_path, dtype="f32", n_threads=1)
    b = VisionEncoder.load(legacy_path, dtype="f32", n_threads=1)
    assert not a.legacy_ffn and b.legacy_ffn
    px = pixels([(448, 448), (98, 140)], seed=8)
    assert np.array_equal(a.encode_slices(px), b.encode_slices(px))


# ----------------------------------------------------------------------------------------------
# API, options, bad input


def test_unpacked_linears_and_small_batches_agree(tiny_mmproj_gguf, enc32, monkeypatch):
    """oneDNN-packed weights vs plain F.linear; a token budget that splits the call into several
    tower batches (whole groups stay together) changes nothing."""
    import minicpmv.runtime.vision as vision
    import minicpmv.runtime.vision_weights as vision_weights

    px = pixels([(224, 224), (98, 70), (224, 224), (140, 140), (70, 98)], seed=9)
    tids = [[-1], [3, 4], [7], [-1]]
    want = enc32.encode_slices(px, tids)
    monkeypatch.setattr(vision_weights, "USE_ONEDNN_PACKING", False)
    plain = VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="f32", n_threads=1)
    assert not plain.packed
    assert np.abs(plain.encode_slices(px, tids) - want).max() < 1e-5
    monkeypatch.setattr(vision, "MAX_BATCH_TOKENS", 300)
    assert np.abs(enc32.encode_slices(px, tids) - want).max() < 1e-5


def test_attributes_and_options(enc32, enc16, tiny_ckpt, tiny_mmproj_gguf):
    assert enc32.embed_dim == 256 and enc32.query_num == 64 and enc32.image_size == 448 and enc32.patch_size == 14
    assert enc32.dtype == torch.float32 and enc16.dtype == torch.bfloat16
    # f32: every vision/resampler parameter once, except the resampler's attention, folded onto the
    # tower's features (vision_weights.fold_resampler): query, ln_q, Wq, bq, Wk, bk, kv, ln_kv, Wv
    # and bv become the feature scores [H*Q, C], the position scores [H*Q, D], the Gram matrix
    # [C, C], the values [H, C, hd] and their bias [H, hd]. bf16 halves the matrices (LayerNorm
    # parameters, the position table and the Gram matrix stay f32). The low-memory profile
    # (resident=False) keeps neither the tower's matrices nor the resampler's out and proj (read from
    # the mmproj per chunk).
    D, C = enc32.embed_dim, enc32.hparams.n_embd
    HQ = (D // 128) * 64
    n_params = sum(int(np.prod(s)) for n, s in _ckpt_shapes(tiny_ckpt).items() if not n.startswith("llm."))
    consumed = 64 * D + 2 * D + 3 * (D * D + D) + D * C + 2 * D
    assert enc32.weights_nbytes == 4 * (n_params - consumed + HQ * C + HQ * D + C * C + C * D + D)
    fold = enc32.fold
    matrices32 = (
        sum(
            lin.nbytes
            for lin in [enc32.patch, fold.scores, fold.pos_cols, fold.pos_rows]
            + [x for b in enc32.blocks for x in (b.qkv, b.out, b.fc1, b.fc2)]
        )
        + fold.values.nbytes
        + fold.values_bias.nbytes
        + enc32.resampler.nbytes
    )
    assert enc16.weights_nbytes == enc32.weights_nbytes - matrices32 // 2  # exactly the matrices halve
    streamed = VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="f32", n_threads=1, resident=False)
    tower = sum(x.nbytes for b in enc32.blocks for x in (b.qkv, b.out, b.fc1, b.fc2))
    assert streamed.weights_nbytes == enc32.weights_nbytes - tower - enc32.resampler.nbytes
    assert 1 <= default_threads() <= (os.cpu_count() or 1)


def _ckpt_shapes(ckpt):
    from minicpmv.convert.checkpoint import Checkpoint

    ck = Checkpoint(ckpt)
    return {n: ck.shape(n) for n in ck.names()}


def test_bad_input(enc32, tiny_mmproj_gguf, tmp_path):
    good = pixels([(28, 28)])[0]
    with pytest.raises(VisionInputError, match=r"pixels\[1\]"):
        enc32.encode_slices([good, good[:, :20]])
    with pytest.raises(VisionInputError, match=r"pixels\[0\]"):
        enc32.encode_slices([good[0]])
    with pytest.raises(VisionInputError, match="no slices"):
        enc32.encode_slices([])
    with pytest.raises(VisionInputError, match="temporal_ids"):
        enc32.encode_slices([good, good], [[1, 2, 3]])
    with pytest.raises(VisionInputError, match="temporal_ids"):
        enc32.encode_slices([good], [[-2]])
    with pytest.raises(VisionInputError, match="temporal_ids"):
        enc32.encode_slices([good], [["x"]])
    with pytest.raises(VisionInputError, match="dtype"):
        VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="f16")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(MmprojError, match="junk.gguf"):
        VisionEncoder.load(junk)
    with pytest.raises(MmprojError, match="not found"):
        VisionEncoder.load(tmp_path / "missing.gguf")


def test_lm_gguf_is_not_an_mmproj(tiny_lm_gguf):
    with pytest.raises(MmprojError, match="missing"):
        load_mmproj(tiny_lm_gguf("F32"))


# ----------------------------------------------------------------------------------------------
# memory: weights read per chunk (resident=False) and tower sub-batches


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_streamed_weights_and_sub_batches_compute_the_same(tiny_mmproj_gguf, dtype):
    """resident=False reads the tower and resampler matrices from the mmproj for every chunk: the
    same numbers as resident weights, bit for bit; sub-batches of whole slices change nothing
    beyond float rounding (attention never crosses a slice)."""
    path = tiny_mmproj_gguf("f16")
    kw = dict(dtype=dtype, n_threads=1)
    px = pixels(MIXED, seed=21)
    groups = [[-1], [-1], [-1], [3, 4]]
    whole = VisionEncoder.load(path, **kw)
    streamed = VisionEncoder.load(path, resident=False, **kw)
    one_slice = VisionEncoder.load(path, resident=False, sub_batch_tokens=1, **kw)
    want = whole.encode_slices(px, groups)
    np.testing.assert_array_equal(streamed.encode_slices(px, groups), want)
    got = one_slice.encode_slices(px, groups)
    assert np.abs(got - want).max() < (1e-5 if dtype == "f32" else 0.02)
    assert streamed.blocks is None
    tower = sum(lin.nbytes for b in whole.blocks for lin in (b.qkv, b.out, b.fc1, b.fc2))
    # neither the tower's matrices nor the resampler's are kept
    assert whole.weights_nbytes - streamed.weights_nbytes == tower + whole.resampler.nbytes


def test_sub_batches_keep_slices_whole():
    from minicpmv.runtime.vision import _sub_batches

    lens = [1024, 1024, 600, 35, 2000, 5000]
    for budget in (1, 1024, 2048, 3000, 4096, 100000):
        subs = _sub_batches(lens, budget)
        assert [i for _, _, sl in subs for i in range(len(lens))[sl]] == list(range(len(lens)))
        assert subs[0][0] == 0 and subs[-1][1] == sum(lens)
        for lo, hi, sl in subs:
            assert hi - lo == sum(lens[sl])
            assert hi - lo <= budget or sl.stop - sl.start == 1
