"""The language model's file mapped with the pages of copied weights dropped (runtime/weight_pages.py).

Checked page by page in this process's page table (/proc/self/pagemap, bit 63 = present): after a
load and a prefill, no page of a tensor llama.cpp copied into CPU_REPACK is mapped, every page of a
tensor used in place is, and of the token embedding table only the pages holding rows that were
read; and the logits equal those of the file read into memory and of llama.cpp's own mapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

FAULT_AROUND = 64 << 10   # Linux fault_around_bytes default
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")

PROBE = textwrap.dedent("""
    import json, os, struct, sys
    from minicpmv.gguf_info import read_gguf_info
    from minicpmv.runtime.llama import ContextParams, LlamaContext, LlamaModel
    from minicpmv.runtime.weight_pages import file_mappings
    path, how = sys.argv[1], sys.argv[2]
    m = LlamaModel(path, n_gpu_layers=0, read_file={"default": None, "read": True, "mapped": False}[how])
    ctx = LlamaContext(m, ContextParams(n_ctx=256, n_batch=64, n_threads=2))
    toks = [5, 9, 5, 20, 9, 30]                   # rows 5, 9, 20 and 30 of token_embd are read
    ctx.decode_tokens(toks, 0)
    out = {"repacked": sorted(m.buffers.repacked), "logits": ctx.logits()[:48].tolist(), "tensors": {}}
    page = os.sysconf("SC_PAGE_SIZE")
    maps = file_mappings(path)
    if how == "default":
        (start, end, moff), = maps                 # llama.cpp maps the file once
        with open("/proc/self/pagemap", "rb") as pm:
            def present(off):                      # is file offset `off` mapped, and that page present?
                if not moff <= off < moff + end - start:
                    return False
                pm.seek((start + off - moff) // page * 8)
                return bool(struct.unpack("<Q", pm.read(8))[0] >> 63)
            for t in read_gguf_info(path).tensors.values():
                first, last = -(-t.offset // page), (t.offset + t.nbytes) // page   # whole pages only
                out["tensors"][t.name] = [p for p in range(first, last) if present(p * page)], max(0, last - first)
    out["n_maps"], out["page"] = len(maps), page
    print(json.dumps(out))
""")


def _probe(path, how: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), how], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_copied_weights_leave_the_page_table(tiny_lm_gguf):
    from minicpmv.gguf_info import read_gguf_info
    from minicpmv.runtime.buffers import repack_tensors, system_features

    path = tiny_lm_gguf("Q4_K_M")
    info = read_gguf_info(path)
    copied = set(repack_tensors(((t.name, t.shape, t.ggml_type) for t in info.tensors.values()), system_features()))
    if not copied:
        pytest.fail("llama.cpp repacks nothing on this CPU: nothing to check the dropped pages against")
    out = _probe(path, "default")
    tensors = out["tensors"]
    in_place = [n for n in tensors if n not in copied and n != "token_embd.weight"]
    assert any(tensors[n][1] for n in in_place), "no tensor used in place spans a whole page: nothing checked"
    # reading a row faults its page in, and the kernel maps the cached pages around it too
    # ("fault-around", 64 KiB aligned windows by default): those are the only pages that may come back
    t, page = info.tensors["token_embd.weight"], out["page"]
    read_pages = {b // page for r in (5, 9, 20, 30)
                  for b in (t.offset + r * t.row_bytes, t.offset + (r + 1) * t.row_bytes - 1)}
    per_window = FAULT_AROUND // page
    around = {w * per_window + i for w in {p // per_window for p in read_pages} for i in range(per_window)}
    for name, (present, pages) in tensors.items():
        if name in copied:
            assert set(present) <= around, f"{name}: pages {sorted(set(present) - around)} still mapped after " \
                                            "it was copied"
        elif name != "token_embd.weight":
            assert len(present) == pages, f"{name} is used in place but {pages - len(present)} of its {pages} " \
                                          "pages were dropped"
    present, pages = tensors["token_embd.weight"]
    assert read_pages <= set(present) <= around, (sorted(read_pages), present)
    assert len(present) < pages, "the whole token embedding table is mapped"
    dropped = sum(p for n, (_, p) in tensors.items() if n in copied)
    assert dropped > 100, f"only {dropped} pages of copied tensors: the check says little"


def test_same_logits_as_read_and_mapped_loads(tiny_lm_gguf):
    path = tiny_lm_gguf("Q4_K_M")
    default, read, mapped = (_probe(path, how) for how in ("default", "read", "mapped"))
    assert default["logits"] == read["logits"] == mapped["logits"]
    assert default["n_maps"] == 1 and read["n_maps"] == 0
