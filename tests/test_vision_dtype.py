"""`--vision-dtype auto` is decided by a measurement on the machine, cached (runtime/vision_dtype.py)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from minicpmv.cpu import CpuInfo, parse_cpuinfo
from minicpmv.runtime import vision_dtype as vd
from minicpmv.runtime.vision import VisionEncoder


def fixed(f32_ms: float, bf16_ms: float):
    calls = []

    def measure(threads: int):
        calls.append(threads)
        return f32_ms, bf16_ms

    measure.calls = calls
    return measure


@pytest.mark.parametrize(
    "f32_ms, bf16_ms, want",
    [
        (200.0, 100.0, "bf16"),  # clearly faster
        (100.0, 2700.0, "f32"),  # bf16 much slower (generic kernels, e.g. on some ARM CPUs)
        (100.0, 90.0, "f32"),  # faster, but within the margin: f32 is the more exact one
        (115.0, 100.0, "bf16"),  # exactly the margin
        (100.0, 100.0, "f32"),
    ],
)
def test_decision(tmp_path, f32_ms, bf16_ms, want):
    assert vd.decide(f32_ms, bf16_ms) == want
    m = fixed(f32_ms, bf16_ms)
    c = vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m)
    assert (c.dtype, c.source, c.f32_ms, c.bf16_ms) == (want, "measured", f32_ms, bf16_ms)
    assert m.calls == [2]
    assert c.torch_dtype == (torch.bfloat16 if want == "bf16" else torch.float32)
    assert "f32" in c.describe() and "bf16" in c.describe() and "\n" not in c.describe()


def test_cache_hit_keyed_by_threads(tmp_path):
    m = fixed(200.0, 100.0)
    first = vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m)
    again = vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m)
    assert m.calls == [2] and again.source == "cached" and again.dtype == first.dtype == "bf16"
    vd.choose_vision_dtype("auto", 1, cache=tmp_path, measure_fn=m)  # other thread count: new key
    assert m.calls == [2, 1]
    data = json.loads((tmp_path / vd.CACHE_FILE).read_text())
    assert len(data) == 2 and all(vd.cache_key(t) in data for t in (1, 2))


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"KEY": {"probe": 1, "f32_ms": "x", "bf16_ms": 1}}',
        '{"KEY": {"probe": 0, "f32_ms": 200, "bf16_ms": 100}}',  # stale probe
        '{"KEY": 7}',
    ],
)
def test_corrupt_or_stale_cache_is_measured_again(tmp_path, content):
    (tmp_path / vd.CACHE_FILE).write_text(content.replace("KEY", vd.cache_key(2).replace('"', '\\"')))
    m = fixed(100.0, 200.0)
    c = vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m)
    assert c.source == "measured" and c.dtype == "f32" and m.calls == [2]
    assert vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m).source == "cached"


def test_unwritable_cache_is_no_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    m = fixed(200.0, 100.0)
    assert vd.choose_vision_dtype("auto", 2, cache=blocker / "sub", measure_fn=m).dtype == "bf16"


def scripted(times: dict[str, list[float]]):
    """A probe step that returns each dtype's next scripted time, recording the order of calls."""
    order = []

    def run(name: str) -> float:
        order.append(name)
        return times[name].pop(0)

    run.order = order
    return run


def test_probe_dtypes_take_turns_so_a_burst_slows_both():
    """A burst of load from elsewhere that covers two back-to-back runs (here bf16's first two timed
    runs, 90 ms as slow as f32) does not decide: the dtypes alternate and each keeps its best."""
    run = scripted({"f32": [95, 88, 86, 87, 85], "bf16": [50, 90, 90, 47, 46]})
    assert vd.time_interleaved(run, rounds=4) == (85, 46)
    assert run.order == ["f32", "bf16"] + ["f32", "bf16"] * 4
    assert vd.decide(85, 46) == "bf16"


def test_probe_stops_after_a_clearly_slower_bf16_warm_up():
    run = scripted({"f32": [90], "bf16": [400]})
    assert vd.time_interleaved(run, rounds=4) == (90, 400)
    assert run.order == ["f32", "bf16"]


def test_forced_dtype_measures_nothing(tmp_path):
    def boom(threads):
        raise AssertionError("a forced dtype must not measure")

    for req, want in (("bf16", "bf16"), ("f32", "f32"), ("bfloat16", "bf16"), ("float32", "f32")):
        c = vd.choose_vision_dtype(req, 2, cache=tmp_path, measure_fn=boom)
        assert (c.dtype, c.source) == (want, "forced")
    with pytest.raises(ValueError, match="auto, bf16, f32"):
        vd.choose_vision_dtype("fp8", 2, cache=tmp_path, measure_fn=boom)


def test_encoder_load_follows_the_cached_measurement(tiny_mmproj_gguf, monkeypatch, tmp_path):
    """VisionEncoder.load(dtype="auto") runs in what the measurement chose (here planted in the cache)."""
    monkeypatch.setenv("MINICPMV_CACHE", str(tmp_path))
    for f32_ms, bf16_ms, want in ((100.0, 300.0, torch.float32), (300.0, 100.0, torch.bfloat16)):
        key = vd.cache_key(1)
        (tmp_path / vd.CACHE_FILE).write_text(
            json.dumps({key: {"probe": vd.PROBE_VERSION, "f32_ms": f32_ms, "bf16_ms": bf16_ms}})
        )
        enc = VisionEncoder.load(tiny_mmproj_gguf("f32"), dtype="auto", n_threads=1)
        assert enc.dtype == want and enc.dtype_choice.source == "cached"
        enc.close()


def _direct_ratio(threads: int) -> float:
    """f32 time / bf16 time of the probe's largest product ([1024, 1152] x [1152, 3456]) with plain
    torch.mm, best of 5: an independent look at whether bf16 is faster here."""
    best = {}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(1024, 1152).to(dt), torch.randn(1152, 3456).to(dt)
            torch.mm(a, b)
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                torch.mm(a, b)
                ts.append(time.perf_counter() - t0)
            best[dt] = min(ts)
    finally:
        torch.set_num_threads(old)
    return best[torch.float32] / best[torch.bfloat16]


def test_auto_on_this_machine_agrees_with_a_direct_timing(tmp_path):
    """The real measurement on this machine against a direct timing of both dtypes. Where the two
    dtypes are within noise of the margin (ratio 1.0-1.4) either answer is right."""
    c = vd.choose_vision_dtype("auto", 2, cache=tmp_path)
    assert c.source == "measured" and c.f32_ms > 0 and c.bf16_ms > 0
    ratio = _direct_ratio(2)
    if ratio >= 1.4:
        assert c.dtype == "bf16", (ratio, c.describe())
    elif ratio <= 1.0:
        assert c.dtype == "f32", (ratio, c.describe())


# Two aarch64 machines as /proc/cpuinfo shows them: no "model name" line, so only the feature flags
# tell the cores apart (here one with bf16 and i8mm, one without).
AARCH64_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp{extra}
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c
"""


def _aarch64(extra: str) -> CpuInfo:
    model, flags, cores = parse_cpuinfo(AARCH64_CPUINFO.format(extra=extra))
    assert model == "" and "asimddp" in flags  # what cpu_info() then fills in: the same for both
    return CpuInfo(model or "unknown CPU", "aarch64", "Linux", flags, cores or 2, 2)


def test_cache_key_tells_cpus_apart_by_their_flags(monkeypatch, tmp_path):
    """A measurement made on one CPU is not used on another that shares its name (and architecture)."""
    plain, newer = _aarch64(""), _aarch64(" bf16 i8mm")
    assert plain.model == newer.model and plain.flags != newer.flags
    keys = {}
    for name, info in (("plain", plain), ("newer", newer)):
        monkeypatch.setattr(vd, "cpu_info", lambda info=info: info)
        keys[name] = vd.cache_key(2)
        assert vd.cache_key(2) == keys[name]  # the same machine: the same key
    assert keys["plain"] != keys["newer"]
    assert plain.flags_digest in keys["plain"] and newer.flags_digest in keys["newer"]

    # through the cache: each CPU is measured once, and keeps its own result
    m = fixed(200.0, 100.0)
    monkeypatch.setattr(vd, "cpu_info", lambda: plain)
    assert vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m).dtype == "bf16"
    monkeypatch.setattr(vd, "cpu_info", lambda: newer)
    assert vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=fixed(100.0, 200.0)).dtype == "f32"
    monkeypatch.setattr(vd, "cpu_info", lambda: plain)
    again = vd.choose_vision_dtype("auto", 2, cache=tmp_path, measure_fn=m)
    assert (again.source, again.dtype, m.calls) == ("cached", "bf16", [2])


def test_cache_key_names_the_architecture(monkeypatch):
    """The same name and flags on another architecture (e.g. an x86 emulator on an ARM host) is
    another key."""
    info = _aarch64("")
    keys = set()
    for arch in ("aarch64", "x86_64"):
        monkeypatch.setattr(vd, "cpu_info", lambda arch=arch: dataclasses.replace(info, machine=arch))
        keys.add(vd.cache_key(2))
    assert len(keys) == 2
