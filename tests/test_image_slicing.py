"""Reference-faithful image slicing (runtime/image.py) against hard-coded worked examples, an
independent re-derivation, PIL's own resize/crop, and a re-implementation of llama.cpp mtmd's plan
(to pin where mtmd differs from the reference, which we follow)."""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import subprocess
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from minicpmv.runtime import image as mi
from minicpmv.runtime.image import (
    ImageError,
    find_best_resize,
    get_refine_size,
    get_sliced_grid,
    load_image,
    slice_image,
)
from minicpmv.runtime.prompt import IMAGE_TAG, Slot, place_media

BICUBIC = Image.Resampling.BICUBIC


# --------------------------------------------------------------------------- independent oracle
# Written from docs/reference-model.md §4 without looking at runtime/image.py: integer
# arithmetic for the half-to-even snapping, candidates ranked by (error, enumeration index).
# The sqrt/truncation step keeps the reference's float64 arithmetic on purpose: exact rational
# arithmetic gives different sizes for some inputs (see test_float_artifacts_are_reproduced).


def snap14(n: int, p: int = 14) -> int:
    q, r = divmod(int(n), p)
    if 2 * r > p or (2 * r == p and q % 2 == 1):
        q += 1
    return max(q * p, p)


def fit_area(w: int, h: int, upscale: bool) -> tuple[int, int]:
    if upscale or w * h > 448**2:
        aspect = w / h
        h = int(448 / math.sqrt(aspect))
        w = int(h * aspect)
    return snap14(w), snap14(h)


def oracle_plan(W: int, H: int, max_slices: int = 9) -> dict:
    """grid (cols, rows) | None, overview (w, h), refined (w, h) | None, slice (w, h) | None."""
    n = min(-(-W * H // 448**2), max_slices)
    if n <= 1:
        return dict(grid=None, overview=fit_area(W, H, True), refined=None, slice=None)
    grids = [(m, k // m) for k in (n - 1, n, n + 1) if 1 < k <= max_slices for m in range(1, k + 1) if k % m == 0]
    target = math.log(W / H)
    ranked = sorted(range(len(grids)), key=lambda i: (abs(target - math.log(grids[i][0] / grids[i][1])), i))
    cols, rows = grids[ranked[0]]
    cell = fit_area(snap14(W, cols) // cols, snap14(H, rows) // rows, True)
    return dict(grid=(cols, rows), overview=fit_area(W, H, False), refined=(cell[0] * cols, cell[1] * rows), slice=cell)


def our_plan(W: int, H: int, max_slices: int = 9) -> dict:
    grid = get_sliced_grid((W, H), max_slices)
    if grid is None:
        return dict(grid=None, overview=find_best_resize((W, H), allow_upscale=True), refined=None, slice=None)
    rw, rh = get_refine_size((W, H), grid)
    return dict(
        grid=grid,
        overview=find_best_resize((W, H), allow_upscale=False),
        refined=(rw, rh),
        slice=(rw // grid[0], rh // grid[1]),
    )


# --------------------------------------------------------------------------- llama.cpp mtmd plan
# Re-implementation of mtmd_image_preprocessor_llava_uhd::get_slice_instructions + slice_image
# (ggml-org/llama.cpp@0c1e57098 tools/mtmd/mtmd-image.cpp, docs/llamacpp.md §4.2-§4.3): float32
# arithmetic, std::round (half away from zero), slicing whenever a side exceeds 448, unsliced
# images stretched to 448x448, refined image letter-boxed (PAD_CEIL) onto black.

f32 = np.float32


def c_round(x) -> float:
    x = float(x)
    lo = math.floor(x)
    return lo + 1 if x - lo >= 0.5 else lo


def mtmd_snap(n: int, p: int = 14) -> int:
    return max(int(c_round(f32(n) / f32(p)) * p), p)


def mtmd_best_resize(w: int, h: int, upscale: bool) -> tuple[int, int]:
    if w * h > 448 * 448 or upscale:
        r = f32(w) / f32(h)
        h = int(f32(448) / np.sqrt(r))
        w = int(f32(h) * r)
    return mtmd_snap(w), mtmd_snap(h)


def mtmd_slice_plan(W: int, H: int) -> dict:
    if not (W > 448 or H > 448):
        return dict(grid=None, overview=(448, 448), refined=None, slice=None, letterbox=None)
    overview = mtmd_best_resize(W, H, False)
    log_ratio = f32(math.log(f32(W) / f32(H)))
    multiple = int(min(math.ceil(f32(W) * f32(H) / f32(448 * 448)), 9))
    cands = [
        (m, n // m)
        for n in (multiple - 1, multiple, multiple + 1)
        if n != 1 and n <= 9
        for m in range(1, n + 1)
        if n % m == 0
    ]
    grid, best = (1, 1), f32(np.inf)
    for gx, gy in cands:
        err = f32(abs(float(log_ratio) - math.log(gx / gy)))  # float error: ties stay ties
        if err < best:
            grid, best = (gx, gy), err
    gx, gy = grid
    cw, ch = mtmd_best_resize(mtmd_snap(W, gx) // gx, mtmd_snap(H, gy) // gy, True)
    rw, rh = cw * gx, ch * gy
    scale = min(f32(rw) / f32(W), f32(rh) / f32(H))
    inner = (min(math.ceil(f32(W) * scale), rw), min(math.ceil(f32(H) * scale), rh))
    return dict(grid=grid, overview=overview, refined=(rw, rh), slice=(cw, ch), letterbox=inner)


# --------------------------------------------------------------------------- worked examples

# docs/reference-model.md §4.5; "hand" = derived by hand from the docs/reference-model.md §4.1
# formulas (shown in the comment), not listed in the docs.
WORKED = {
    (1344, 1344): dict(grid=(3, 3), overview=(448, 448), refined=(1344, 1344), slice=(448, 448)),
    (1920, 1080): dict(grid=(4, 2), overview=(602, 336), refined=(1680, 952), slice=(420, 476)),
    (640, 480): dict(grid=(2, 1), overview=(518, 392), refined=(728, 546), slice=(364, 546)),
    (800, 600): dict(grid=(2, 2), overview=(518, 392), refined=(1036, 784), slice=(518, 392)),
    (1024, 768): dict(grid=(2, 2), overview=(518, 392), refined=(1036, 784), slice=(518, 392)),
    (448, 448): dict(grid=None, overview=(448, 448), refined=None, slice=None),
    (300, 200): dict(grid=None, overview=(546, 364), refined=None, slice=None),
    # hand: r=1.25, h=int(448/1.1180)=400, w=500 -> 35.7->36*14, 28.6->29*14
    (500, 400): dict(grid=None, overview=(504, 406), refined=None, slice=None),
    # hand: r=2, h=int(316.78)=316, w=632 -> 45.1->45*14, 22.6->23*14
    (600, 300): dict(grid=None, overview=(630, 322), refined=None, slice=None),
    # hand: r=1/4000, h=int(28333.7)=28333 -> 2024*14; w=int(7.08)=7 -> round(0.5)=0 -> min 14
    (1, 4000): dict(grid=None, overview=(14, 28336), refined=None, slice=None),
    # hand: r=4000, h=int(7.08)=7 -> 14; w=int(7*4000)=28000 (not symmetric with 1x4000)
    (4000, 1): dict(grid=None, overview=(28000, 14), refined=None, slice=None),
    (1, 1): dict(grid=None, overview=(448, 448), refined=None, slice=None),
    # square, 6 candidates: log(2/3) and log(3/2) differ in the last bit in float64, so (3, 2) wins
    (1002, 1002): dict(grid=(3, 2), overview=(448, 448), refined=(1092, 1092), slice=(364, 546)),
    # square, 2 slices: log(1/2) == -log(2) exactly, strict "<" keeps the first candidate (1, 2);
    # hand: cell 500x250 -> r=2 -> 630x322 (as 600x300 above)
    (500, 500): dict(grid=(1, 2), overview=(448, 448), refined=(630, 644), slice=(630, 322)),
}
WORKED_UNK = {(1344, 1344): 640, (1920, 1080): 576, (640, 480): 192, (800, 600): 320, (448, 448): 64}

SEEDED = [(random.Random(s).randint(1, 3000), random.Random(s + 100).randint(1, 3000)) for s in range(6)]


def tgt_of(size):
    return (size[1] // 14, size[0] // 14)


@pytest.mark.parametrize("W,H", list(WORKED))
def test_worked_examples(W, H):
    want = WORKED[(W, H)]
    assert our_plan(W, H) == want
    assert oracle_plan(W, H) == want


@pytest.mark.parametrize("W,H", list(WORKED) + SEEDED)
def test_slice_image_sizes_and_tgt_sizes(W, H):
    want = oracle_plan(W, H)
    s = slice_image(Image.new("RGB", (W, H), (10, 200, 30)))
    assert s.grid == want["grid"]
    assert s.overview.size == want["overview"]
    n = 0 if want["grid"] is None else want["grid"][0] * want["grid"][1]
    assert len(s.slices) == n
    assert all(sl.size == want["slice"] for sl in s.slices)
    assert s.tgt_sizes == [tgt_of(want["overview"])] + ([tgt_of(want["slice"])] * n if n else [])
    pv = s.pixel_values()
    assert [p.shape for p in pv] == [(3, t[0] * 14, t[1] * 14) for t in s.tgt_sizes]
    assert all(p.dtype == np.float32 for p in pv)
    if (W, H) in WORKED_UNK:
        assert placeholder((W, H), 0).count("<unk>") == WORKED_UNK[(W, H)]


def test_tgt_sizes_of_worked_examples():
    assert slice_image(Image.new("RGB", (1920, 1080))).tgt_sizes == [(24, 43)] + [(34, 30)] * 8
    assert slice_image(Image.new("RGB", (1344, 1344))).tgt_sizes == [(32, 32)] * 10
    assert slice_image(Image.new("RGB", (1, 4000))).tgt_sizes == [(2024, 1)]


def test_rules_match_oracle_on_many_sizes():
    rng = random.Random(1234)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(4000)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 4000)) for _ in range(500)]  # thin
    sizes += [(w, w + d) for w in range(440, 1400, 7) for d in (-1, 0, 1)]  # near-square
    for W, H in sizes:
        for msn in (9, 4, 1):
            assert our_plan(W, H, msn) == oracle_plan(W, H, msn), (W, H, msn)


def test_max_slice_nums_and_never_split():
    assert get_sliced_grid((1920, 1080), 1) is None  # video setting: overview only
    assert get_sliced_grid((1920, 1080), 9, never_split=True) is None
    assert get_sliced_grid((4000, 4000), 9) == (3, 3)  # capped at 9 slices
    assert get_sliced_grid((4000, 4000), 4) == (2, 2)
    s = slice_image(Image.new("RGB", (1920, 1080)), never_split=True)
    assert s.grid is None and s.slices == [] and s.overview.size == (602, 336)
    with pytest.raises(ValueError):
        slice_image(Image.new("RGB", (10, 10)), max_slice_nums=0)


def test_float_artifacts_are_reproduced():
    # 897x686 -> grid 2x2, cell 448x343: exact math gives h=392, w=512 -> 518; the reference's
    # float64 gives w=int(511.99999999999994)=511 -> 36.5 -> 36 (half to even) -> 504.
    assert our_plan(897, 686)["slice"] == (504, 392)
    assert int(392 * (448 / 343)) == 511
    # banker's rounding at the snap: 1995/14 = 142.5 -> 142 (mtmd: 143)
    assert mi.ensure_divide(1995, 14) == 1988 and mi.ensure_divide(21, 14) == 28
    assert mi.ensure_divide(7, 14) == 14 and mi.ensure_divide(0.4, 14) == 14


# --------------------------------------------------------------------------- pixels


def noise(W, H, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def norm_ref(img: Image.Image) -> np.ndarray:
    """What the reference's preprocess does: uint8 -> float32 /255 -> transformers normalize."""
    from transformers.image_transforms import normalize

    a = np.asarray(img).astype(np.float32) / 255
    a = normalize(a, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], input_data_format="channels_last")
    return a.transpose(2, 0, 1)


@pytest.mark.parametrize("W,H", [(1000, 700), (640, 480), (300, 200), (1920, 1080), (37, 91)])
def test_pixels_equal_pil_resize_crop_normalize(W, H):
    img = noise(W, H, seed=W)
    s = slice_image(img)
    plan = oracle_plan(W, H)
    expect = [img.resize(plan["overview"], BICUBIC)]
    if plan["grid"]:
        refined = img.resize(plan["refined"], BICUBIC)
        (sw, sh), (cols, rows) = plan["slice"], plan["grid"]
        expect += [refined.crop((c * sw, r * sh, c * sw + sw, r * sh + sh)) for r in range(rows) for c in range(cols)]
    got = s.pixel_values()
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        e8 = np.asarray(e)
        assert np.array_equal(g, norm_ref(e))  # bitwise = reference pipeline
        f64 = (e8.astype(np.float64) / 255 - 0.5) / 0.5  # and numerically the formula
        assert np.abs(g - f64.transpose(2, 0, 1)).max() < 1e-6
        assert g.min() >= -1 and g.max() <= 1


def test_non_rgb_pil_is_converted_like_the_reference():
    img = noise(700, 500, seed=3).convert("RGBA")
    img.putalpha(Image.fromarray(np.full((500, 700), 77, np.uint8)))
    a, b = slice_image(img), slice_image(img.convert("RGB"))
    assert all(np.array_equal(x, y) for x, y in zip(a.pixel_values(), b.pixel_values()))


def test_patch_rows_match_unfold_layout():
    torch = pytest.importorskip("torch")
    from minicpmv.runtime.vision_ops import patch_rows

    px = np.random.default_rng(0).standard_normal((3, 28, 42)).astype(np.float32)
    # the reference's unfold gives [3*14*14, L] with rows ordered (channel, kh, kw)
    cols = torch.nn.functional.unfold(torch.from_numpy(px)[None], 14, stride=14)[0]
    assert np.array_equal(patch_rows(px, 14).numpy(), cols.T.numpy())


def test_only_needed_resizes(monkeypatch):
    calls = []
    orig = Image.Image.resize

    def counting(self, *a, **k):
        calls.append(self.size)
        return orig(self, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", counting)
    slice_image(Image.new("RGB", (1920, 1080)))
    assert len(calls) == 2  # overview + refined; slices are crops
    calls.clear()
    slice_image(Image.new("RGB", (300, 200)))
    assert len(calls) == 1


def test_large_image_is_fast():
    img = noise(4000, 3000, seed=7)
    t = time.perf_counter()
    s = slice_image(img)
    pv = s.pixel_values()
    dt = time.perf_counter() - t
    assert s.grid == (3, 3) and len(pv) == 10
    assert dt < 3.0, f"slicing 4000x3000 took {dt:.2f} s"


# --------------------------------------------------------------------------- placeholder


def placeholder(size: tuple[int, int], image_id: int | None, query_num: int = 64, unk: str = "<unk>") -> str:
    """The prompt text of one image of `size` as the runtime expands it (prompt.expand), every slot
    written as `query_num` x `unk` like the reference; `image_id` is the image's index."""
    n = 1 if image_id is None else image_id + 1
    text = "".join(f"[{k}]{IMAGE_TAG}" for k in range(n))
    p = place_media(text, [Image.new("RGB", size)] * n, use_image_id=image_id is not None, query_num=query_num)
    out = "".join(unk * query_num if isinstance(s, Slot) else s for s in p.segments)
    return out.split(f"[{n - 1}]", 1)[1]


def test_placeholder_text():
    u = "<unk>" * 64
    assert get_sliced_grid((1792, 896)) == (4, 2) and get_sliced_grid((896, 1344)) == (2, 3)
    assert placeholder((448, 448), None) == "<image>" + u + "</image>"
    assert placeholder((448, 448), 0) == "<image_id>0</image_id><image>" + u + "</image>"
    row = ("<slice>" + u + "</slice>") * 4
    want = "<image_id>12</image_id><image>" + u + "</image>" + row + "\n" + row
    assert placeholder((1792, 896), 12) == want
    t = placeholder((896, 1344), None, query_num=2, unk="#")
    assert (
        t
        == "<image>##</image><slice>##</slice><slice>##</slice>\n" * 1
        + "<slice>##</slice><slice>##</slice>\n<slice>##</slice><slice>##</slice>"
    )
    assert not t.endswith("\n") and t.count("\n") == 2


# --------------------------------------------------------------------------- llama.cpp mtmd


@pytest.mark.parametrize("W,H", [(640, 480), (800, 600), (1024, 768), (1344, 1344), (1920, 1080), (448, 448)])
def test_mtmd_agrees_on_these_sizes(W, H):
    m, r = mtmd_slice_plan(W, H), our_plan(W, H)
    assert (m["grid"], m["overview"], m["slice"], m["refined"]) == (r["grid"], r["overview"], r["slice"], r["refined"])


def test_mtmd_plan_matches_documented_table():
    # docs/llamacpp.md §4.5 (the mtmd plans)
    t = {
        (300, 200): (None, (448, 448), None),
        (448, 448): (None, (448, 448), None),
        (500, 400): ((2, 1), (504, 406), (350, 560)),
        (600, 300): ((2, 1), (602, 294), (448, 448)),
        (640, 480): ((2, 1), (518, 392), (364, 546)),
        (800, 600): ((2, 2), (518, 392), (518, 392)),
        (1344, 1344): ((3, 3), (448, 448), (448, 448)),
        (1920, 1080): ((4, 2), (602, 336), (420, 476)),
    }
    for (W, H), want in t.items():
        m = mtmd_slice_plan(W, H)
        assert (m["grid"], m["overview"], m["slice"]) == want, (W, H)


def test_where_mtmd_differs_from_the_reference():
    """We follow the reference; these are the documented mtmd differences."""
    # small images: mtmd stretches to 448x448, the reference keeps the aspect ratio
    assert mtmd_slice_plan(300, 200)["overview"] == (448, 448)
    assert our_plan(300, 200)["overview"] == (546, 364)
    # a side > 448 but area <= 448^2: mtmd slices, the reference does not
    for W, H in [(500, 400), (600, 300)]:
        assert mtmd_slice_plan(W, H)["grid"] == (2, 1) and our_plan(W, H)["grid"] is None
    # half-away-from-zero vs half-to-even: 101x2003 -> h = 1995 = 142.5 * 14
    assert mtmd_slice_plan(101, 2003)["overview"] == (98, 2002)
    assert our_plan(101, 2003)["overview"] == (98, 1988)
    # float32 error ties: mtmd keeps the first of (2,3)/(3,2); the reference's float64 picks (3,2)
    assert mtmd_slice_plan(1002, 1002)["grid"] == (2, 3)
    assert our_plan(1002, 1002)["grid"] == (3, 2)
    # letter-boxing: mtmd's refined 1000x700 keeps the aspect inside a black border
    m = mtmd_slice_plan(1000, 700)
    assert m["refined"] == our_plan(1000, 700)["refined"] == (1064, 756)
    assert m["letterbox"] != m["refined"]
    assert mtmd_slice_plan(1344, 1344)["letterbox"] == (1344, 1344)  # no border: same slices


def test_mtmd_and_reference_disagree_often_on_rounding():
    rng = random.Random(5)
    sizes = [(rng.randint(449, 3000), rng.randint(449, 3000)) for _ in range(2000)]
    differ = sum(mtmd_slice_plan(W, H)["overview"] != our_plan(W, H)["overview"] for W, H in sizes)
    # ~7%: a side lands on a .5 tie about once in 14; documented, not "fixed"
    assert 0.03 < differ / len(sizes) < 0.15


# --------------------------------------------------------------------------- compiled llama.cpp
# The same checks against llama.cpp's own code: a tiny harness (our code) compiled against the
# llama.cpp headers of the source copy and the libmtmd.so that llama-cpp-python ships. It calls
# mtmd_image_preprocessor_llava_uhd::get_slice_instructions / slice_image with MiniCPM-V's
# hparams (image_size 448, patch 14, no pinpoints). The headers come from tests/llama_sources.py.

HARNESS = r"""
#include "mtmd-image.h"
#include <cstdio>
#include <cstdlib>
static clip_hparams g_hp;
const clip_hparams * clip_get_hparams(const struct clip_ctx *) { return &g_hp; }
static void put(FILE * f, const clip_image_u8 & im) {
    auto s = im.get_size();
    std::fwrite(&s.width, 4, 1, f); std::fwrite(&s.height, 4, 1, f);
    for (int y = 0; y < s.height; y++) for (int x = 0; x < s.width; x++) {
        auto p = im.get_pixel(x, y); std::fwrite(p.data(), 1, 3, f);
    }
}
int main(int argc, char ** argv) {
    g_hp.image_size = 448; g_hp.patch_size = 14; g_hp.n_merge = 1;
    mtmd_image_preprocessor_llava_uhd pp(nullptr);
    if (argc == 1) {  // plan mode: "W H" pairs on stdin
        int w, h;
        while (std::scanf("%d %d", &w, &h) == 2) {
            auto in = pp.get_slice_instructions(clip_image_size{w, h});
            std::printf("%d %d %d %d %d %d\n", in.grid_size.width, in.grid_size.height, in.overview_size.width,
                        in.overview_size.height, in.refined_size.width, in.refined_size.height);
        }
        return 0;
    }
    int w = std::atoi(argv[2]), h = std::atoi(argv[3]);  // pixel mode: in.rgb W H out.bin
    FILE * fi = std::fopen(argv[1], "rb");
    clip_image_u8 img; img.set_size({w, h}, false);
    for (int y = 0; y < h; y++) for (int x = 0; x < w; x++) {
        std::array<uint8_t, 3> p; if (std::fread(p.data(), 1, 3, fi) != 3) return 1; img.set_pixel(x, y, p);
    }
    std::fclose(fi);
    auto out = pp.slice_image(img, pp.get_slice_instructions(img.get_size()));
    FILE * fo = std::fopen(argv[4], "wb");
    put(fo, out.overview);
    for (auto & s : out.slices) put(fo, s);
    std::fclose(fo);
    return 0;
}
"""


@pytest.fixture(scope="module")
def mtmd_exe(tmp_path_factory):
    import llama_cpp

    from .llama_sources import llama_cpp_source_dir

    src = llama_cpp_source_dir()
    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (make install / .ci/run provide one)"
    d = tmp_path_factory.mktemp("mtmd")
    (d / "h.cpp").write_text(HARNESS)
    exe = d / "h"
    inc = [f"-I{src / p}" for p in ("tools/mtmd", "include", "ggml/include")]
    r = subprocess.run(
        [cxx, "-std=c++17", "-O1", *inc, str(d / "h.cpp"), f"-L{lib}", "-lmtmd", f"-Wl,-rpath,{lib}", "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, "harness does not compile: " + r.stderr[-500:]
    return exe


def run_mtmd_plans(exe, sizes):
    r = subprocess.run(
        [str(exe)], input="".join(f"{w} {h}\n" for w, h in sizes), capture_output=True, text=True, check=True
    )
    out = []
    for line in r.stdout.splitlines():
        gx, gy, ow, oh, rw, rh = map(int, line.split())
        grid = (gx, gy) if gx else None
        out.append(
            dict(
                grid=grid,
                overview=(ow, oh),
                refined=(rw, rh) if grid else None,
                slice=(rw // gx, rh // gy) if grid else None,
            )
        )
    return out


def run_mtmd_pixels(exe, arr, tmp_path):
    h, w, _ = arr.shape
    arr.tofile(tmp_path / "in.rgb")
    subprocess.run(
        [str(exe), str(tmp_path / "in.rgb"), str(w), str(h), str(tmp_path / "out.bin")], check=True, capture_output=True
    )
    b, o, ims = (tmp_path / "out.bin").read_bytes(), 0, []
    while o < len(b):
        iw, ih = np.frombuffer(b[o : o + 8], np.int32)
        o += 8
        ims.append(np.frombuffer(b[o : o + iw * ih * 3], np.uint8).reshape(ih, iw, 3))
        o += iw * ih * 3
    return ims


def test_mtmd_plan_emulation_matches_compiled_llamacpp(mtmd_exe):
    rng = random.Random(77)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    sizes += [(w, w) for w in range(440, 1500, 3)] + [
        (101, 2003),
        (1002, 1002),
        (300, 200),
        (500, 400),
        (600, 300),
        (1, 4000),
        (4000, 1),
        (1, 1),
    ]
    got = run_mtmd_plans(mtmd_exe, sizes)
    for (W, H), g in zip(sizes, got):
        m = mtmd_slice_plan(W, H)
        assert {k: m[k] for k in g} == g, (W, H)


@pytest.mark.parametrize(
    "W,H,same_slices",
    [(1344, 1344, True), (640, 480, True), (896, 448, True), (448, 448, True), (1000, 700, False), (1920, 1080, False)],
)
def test_mtmd_pixels_equal_ours_unless_letterboxed(mtmd_exe, tmp_path, W, H, same_slices):
    """mtmd's resampler is a Pillow port: the overview is bit-identical; slices are identical
    only when the refined image keeps the original aspect (no letter-box border)."""
    arr = np.random.default_rng(W + H).integers(0, 256, (H, W, 3), dtype=np.uint8)
    theirs = run_mtmd_pixels(mtmd_exe, arr, tmp_path)
    ours = [np.asarray(im) for im in slice_image(Image.fromarray(arr)).images]
    assert [t.shape for t in theirs] == [o.shape for o in ours]
    assert np.array_equal(theirs[0], ours[0])
    same = [np.array_equal(t, o) for t, o in zip(theirs[1:], ours[1:])]
    assert all(same) if same_slices else not any(same)
    m = mtmd_slice_plan(W, H)
    assert (m["letterbox"] in (None, m["refined"])) == same_slices


def test_mtmd_small_image_pixels_differ(mtmd_exe, tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    theirs = run_mtmd_pixels(mtmd_exe, arr, tmp_path)
    assert [t.shape for t in theirs] == [(448, 448, 3)]  # stretched
    assert slice_image(Image.fromarray(arr)).overview.size == (546, 364)  # aspect kept


# --------------------------------------------------------------------------- loading / bad input


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (no pixel data): enough for Image.open to report a size."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def assert_one_line_error(source, *words):
    with pytest.raises(ImageError) as ei:
        load_image(source)
    msg = str(ei.value)
    assert "\n" not in msg and isinstance(ei.value, ValueError)
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, not an image\n")
    assert_one_line_error(txt, str(txt), "not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_one_line_error(empty, str(empty))
    assert_one_line_error(tmp_path / "missing.jpg", "missing.jpg", "no such file")
    assert_one_line_error(tmp_path, str(tmp_path))
    zero = tmp_path / "zero.png"
    zero.write_bytes(png_header(0, 0))
    assert_one_line_error(zero, str(zero))
    good = save(tmp_path, "good.png", noise(64, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert_one_line_error(cut, str(cut), "cannot decode")


def test_huge_images_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_header(20000, 20000))  # 400 MP: beyond PIL's own bomb limit
    assert_one_line_error(big, str(big), "100 MP")
    mid = tmp_path / "mid.png"
    mid.write_bytes(png_header(12000, 12000))  # 144 MP: PIL would only warn
    assert_one_line_error(mid, str(mid), "12000x12000", "100 MP")


def test_empty_and_elongated_pil_images():
    assert_one_line_error(Image.new("RGB", (0, 0)), "<PIL image>", "empty")
    with pytest.raises(ImageError):
        slice_image(Image.new("RGB", (0, 5)))
    assert_one_line_error(Image.new("RGB", (1, 20000)), "aspect")
    with pytest.raises(ImageError):
        slice_image(Image.new("RGB", (30000, 2)))


def test_one_pixel_image_is_upscaled_like_the_reference(tmp_path):
    p = save(tmp_path, "dot.png", Image.new("RGB", (1, 1), (255, 0, 51)))
    img = load_image(p)
    s = slice_image(img)
    assert s.grid is None and s.tgt_sizes == [(32, 32)]
    px = s.pixel_values()[0]
    assert np.allclose(px[:, 0, 0], [1.0, -1.0, 51 / 255 * 2 - 1]) and np.ptp(px, axis=(1, 2)).max() == 0


def test_mode_conversions(tmp_path):
    base = noise(40, 30, seed=11)
    # CMYK (JPEG keeps CMYK; compare with PIL's own conversion of the decoded file)
    p = save(tmp_path, "cmyk.jpg", base.convert("CMYK"), quality=95)
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
        want = np.asarray(raw.convert("RGB"))
    got = load_image(p)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)

    # 16-bit gray PNG: scaled (k*257 -> k), not clipped at 255
    a16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    a16[0, 0], a16[0, 1] = 65535, 128  # 128/257 = 0.498 -> 0
    p = save(tmp_path, "g16.png", Image.fromarray(a16))
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    got = np.asarray(load_image(p))
    want = np.round(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 0], got[..., 2])
    assert got[0, 0, 0] == 255 and got[0, 1, 0] == 0 and got[8, 8, 0] == 136

    # alpha (a palette's transparent index, RGBA, LA) is dropped, not composited over a background:
    # the reference opens every image as Image.open(path).convert("RGB") (docs/architecture.md §4)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    p = save(tmp_path, "pal.png", pal, transparency=0)
    got = np.asarray(load_image(p))
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[1, 1]) == (200, 100, 50)
    rgba = np.asarray(base.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, 40, dtype=np.uint8)[None, :]
    p = save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(np.asarray(load_image(p)), rgba[..., :3])
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    p = save(tmp_path, "la.png", la)
    got = np.asarray(load_image(p))
    assert np.array_equal(got[..., 0], rgba[..., 0]) and np.array_equal(got[..., 0], got[..., 1])

    # plain RGB round-trips untouched; PIL input works too
    p = save(tmp_path, "rgb.png", base)
    assert np.array_equal(np.asarray(load_image(p)), np.asarray(base))
    assert np.array_equal(np.asarray(load_image(base.convert("L"))), np.asarray(base.convert("L").convert("RGB")))


def test_alpha_is_dropped_as_the_reference_does_on_every_path(tmp_path):
    """Fidelity decision (docs/architecture.md §4): an image with transparency reaches the model as
    the reference's Image.open(path).convert("RGB") gives it, whether it comes as a file (chat
    content, CLI) or as a PIL image; transparent pixels keep their stored colour."""
    from minicpmv.runtime.content import Content, load_media

    rgba = np.random.default_rng(5).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows, dark colours kept
    pal = Image.fromarray(rgba[..., :3]).quantize(16)
    files = [
        save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")),
        save(tmp_path, "la.png", Image.fromarray(rgba[..., [0, 3]], "LA")),
        save(tmp_path, "pal.png", pal, transparency=3),
    ]
    content = Content()
    for p in files:
        with Image.open(p) as raw, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL: "palette images with transparency ... RGBA first"
            want = np.asarray(raw.convert("RGB"))
            pil = raw.copy()
        for got in (
            load_image(p),
            load_image(p.read_bytes()),
            load_image(pil),
            load_media(p),
            content.item(p),
            content.item(pil),
        ):
            assert got.mode == "RGB" and np.array_equal(np.asarray(got), want), p.name


def test_other_pil_modes_to_rgb():
    a = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (4, 1), a.astype(">u2").tobytes())
    assert np.asarray(load_image(big_endian))[0, :, 1].tolist() == [0, 100, 255, 128]
    as_int = Image.fromarray(a.astype(np.int32))  # mode "I"
    assert np.asarray(load_image(as_int))[0, :, 1].tolist() == [0, 100, 255, 128]
    flt = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))  # mode "F" in [0, 1]
    assert np.asarray(load_image(flt))[0, :, 0].tolist() == [0, 128, 255]
    for mode in ["1", "L", "YCbCr", "HSV", "CMYK", "RGBX", "RGBa", "La", "PA", "LA"]:
        out = load_image(Image.new(mode, (3, 2)))
        assert out.mode == "RGB" and out.size == (3, 2), mode
