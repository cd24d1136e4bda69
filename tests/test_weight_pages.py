"""The language model's file mapped with the pages of copied weights dropped (runtime/weight_pages.py).

Checked page by page in this process's page table (/proc/self/pagemap, bit 63 = present): after the
load, no page of a tensor llama.cpp copied into CPU_REPACK or of the token embedding table is mapped,
every page of a tensor used in place is; a prefill maps back the pages of the embedding rows it
reads; and the logits equal those of the file read into memory and of llama.cpp's own mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page tables")

PROBE = textwrap.dedent("""
    import json, os, struct, sys
    from minicpmv.gguf_info import read_gguf_info
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.llama_context import ContextParams, LlamaContext
    from minicpmv.runtime.weight_pages import file_mappings
    path, how = sys.argv[1], sys.argv[2]
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> dict:
        # {tensor: ([file pages mapped and present], whole pages it spans)}, from our page table
        (start, end, moff), = file_mappings(path)   # llama.cpp maps the file once
        out = {}
        with open("/proc/self/pagemap", "rb") as pm:
            def present(p):
                if not moff <= p * page < moff + end - start:
                    return False
                pm.seek((start + p * page - moff) // page * 8)
                return bool(struct.unpack("<Q", pm.read(8))[0] >> 63)
            for t in read_gguf_info(path).tensors.values():
                first, last = -(-t.offset // page), (t.offset + t.nbytes) // page   # whole pages only
                out[t.name] = [p for p in range(first, last) if present(p)], max(0, last - first)
        return out

    def vm_flags() -> list[list[str]]:
        # the VmFlags of each mapping of the file, from /proc/self/smaps
        real, flags, ours = os.path.realpath(path), [], False
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    ours = line.rstrip().endswith(" " + real)
                elif ours and line.startswith("VmFlags:"):
                    flags.append(line.split()[1:])
        return flags

    m = LlamaModel(path, n_gpu_layers=0, read_file={"default": None, "read": True, "mapped": False}[how])
    out = {"n_maps": len(file_mappings(path)), "page": page, "vm_flags": vm_flags()}
    if how == "default":
        out["loaded"] = resident()
    ctx = LlamaContext(m, ContextParams(n_ctx=256, n_batch=64, n_threads=2))
    ctx.decode_tokens([5, 9, 5, 20, 9, 30], 0)    # rows 5, 9, 20 and 30 of token_embd are read
    out["logits"] = ctx.logits()[:48].tolist()
    if how == "default":
        out["decoded"] = resident()
    print(json.dumps(out))
""")


def _probe(path, how: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), how], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_copied_weights_leave_the_page_table(tiny_lm_gguf):
    from minicpmv.gguf_info import read_gguf_info
    from minicpmv.runtime.weight_buffers import repack_tensors_in

    path = tiny_lm_gguf("Q4_K_M")
    info = read_gguf_info(path)
    copied = set(repack_tensors_in(path))
    if not copied:
        pytest.fail("llama.cpp repacks nothing on this CPU: nothing to check the dropped pages against")
    out = _probe(path, "default")
    loaded, decoded = out["loaded"], out["decoded"]
    in_place = [n for n in loaded if n not in copied and n != "token_embd.weight"]
    assert any(loaded[n][1] for n in in_place), "no tensor used in place spans a whole page: nothing checked"
    # after the load: nothing of the copied tensors or of the token embedding table is mapped, all of
    # the tensors used in place is (nothing has touched the file since llama.cpp's last callback)
    for name, (present, pages) in loaded.items():
        if name in copied or name == "token_embd.weight":
            assert not present, f"{name}: {len(present)} of its {pages} pages still mapped after the load"
        else:
            assert len(present) == pages, (
                f"{name} is used in place but {pages - len(present)} of its {pages} pages were dropped"
            )
    assert sum(loaded[n][1] for n in copied) > 100, "few pages of copied tensors: the check says little"
    # a prefill reads four rows of the table: their pages come back (with whatever the kernel maps
    # around a fault), the in-place tensors stay
    t, page = info.tensors["token_embd.weight"], out["page"]
    read_pages = {
        b // page for r in (5, 9, 20, 30) for b in (t.offset + r * t.row_bytes, t.offset + (r + 1) * t.row_bytes - 1)
    }
    assert read_pages <= set(decoded["token_embd.weight"][0])
    assert all(len(decoded[n][0]) == decoded[n][1] for n in in_place)
    # the mapping is marked no-huge-page ("nh"): a fault maps the pages around it, not the 2 MB folio
    # (which held pages of copied tensors: +84 MB on the 8B model during its first chat)
    assert out["vm_flags"] and all("nh" in f for f in out["vm_flags"]), out["vm_flags"]


def test_same_logits_as_read_and_mapped_loads(tiny_lm_gguf):
    path = tiny_lm_gguf("Q4_K_M")
    default, read, mapped = (_probe(path, how) for how in ("default", "read", "mapped"))
    assert default["logits"] == read["logits"] == mapped["logits"]
    assert default["n_maps"] == 1 and read["n_maps"] == 0 and mapped["n_maps"] == 1
    assert all("nh" not in f for f in mapped["vm_flags"])  # llama.cpp's own mapping is left as it is


# --------------------------------------------------------------------------- mappings made in this process


def _address(m: mmap.mmap) -> int:
    a = np.frombuffer(m, dtype=np.uint8)  # works on a read-only mapping, unlike ctypes.from_buffer
    try:
        return a.ctypes.data
    finally:
        del a  # an exported buffer would keep the mapping from closing


def _present(addr: int) -> bool:
    """The page at `addr` is in this process's page table (/proc/self/pagemap bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(addr // page * 8)
        return bool(struct.unpack("<Q", pm.read(8))[0] >> 63)


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping that starts at `addr` (/proc/self/smaps)."""
    ours = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                ours = int(head.split("-")[0], 16) == addr
            elif ours and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping at {addr:#x}")


@pytest.fixture
def model_copy(tiny_lm_gguf, tmp_path):
    """A private copy of the F32 tiny model (tests replace it on disk)."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_lm_gguf("F32"), path)
    return path


def test_only_shared_mappings_are_found_and_dropped(model_copy):
    """A private (copy-on-write) mapping of the model file is not one of its mappings: MADV_DONTNEED
    there would discard the pages written to it. The shared one is found, its pages of token_embd
    leave the page table and it is marked no-huge-page (the mmap module's MADV_* at work)."""
    from minicpmv.runtime.model_file import ModelFile
    from minicpmv.runtime.weight_pages import PageDropper, drop_ranges, file_mappings

    f = ModelFile(model_copy)
    shared = mmap.mmap(f.fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    private = mmap.mmap(f.fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        s_addr, p_addr = _address(shared), _address(private)
        assert [(a, o) for a, _, o in file_mappings(f)] == [(s_addr, 0)]
        assert file_mappings(model_copy) == file_mappings(f)  # by name too, while the name is the file's

        (a, b), *_ = drop_ranges(f, set())  # token_embd, in whole pages
        assert b - a >= 2 * os.sysconf("SC_PAGE_SIZE")
        marker = bytes(range(1, 17))
        assert private[a : a + 16] != marker
        private[a : a + 16] = marker  # a copy-on-write page, in this process only
        _ = shared[a], shared[b - 1]  # touched: the pages are mapped
        assert _present(s_addr + a) and _present(s_addr + b - 1)

        PageDropper(f, set()).drop()
        assert private[a : a + 16] == marker, "a private mapping was dropped: its written page is lost"
        assert not _present(s_addr + a) and not _present(s_addr + b - 1)
        assert "nh" in _vm_flags(s_addr) and "nh" not in _vm_flags(p_addr)
        assert shared[a : a + 16] == model_copy.read_bytes()[a : a + 16]  # a dropped page reads back the file
    finally:
        shared.close()
        private.close()
        f.close()


def test_a_file_replaced_on_disk_is_found_through_its_open_file(model_copy, tiny_lm_gguf):
    """`minicpm-convert --force` renames a new file over a loaded one: the mapping of the old inode
    (now "(deleted)" in /proc/self/maps) is still found through the ModelFile, by device and inode."""
    from minicpmv.runtime.model_file import ModelFile
    from minicpmv.runtime.weight_pages import file_mappings

    f = ModelFile(model_copy)
    shared = mmap.mmap(f.fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        new = model_copy.with_name("new.gguf")
        shutil.copyfile(tiny_lm_gguf("F32"), new)
        os.replace(new, model_copy)
        assert os.stat(model_copy).st_ino != f.identity[1]
        assert [a for a, _, _ in file_mappings(f)] == [_address(shared)]
        assert file_mappings(model_copy) == []  # the name now leads to a file nobody mapped
    finally:
        shared.close()
        f.close()


def test_no_page_dropping_without_madvise(monkeypatch, tiny_lm_gguf):
    """Where the mmap module has no MADV_DONTNEED the model is read into memory instead of mapped."""
    from minicpmv.runtime import weight_pages
    from minicpmv.runtime.llama import LlamaModel
    from minicpmv.runtime.llama_load import LOAD_MAPPED_DROPPED, LOAD_READ, load_mode

    assert weight_pages.supported() and load_mode(0, False, None) == LOAD_MAPPED_DROPPED
    monkeypatch.delattr(mmap, "MADV_DONTNEED")
    assert not weight_pages.supported() and load_mode(0, False, None) == LOAD_READ
    m = LlamaModel(tiny_lm_gguf("F32"), n_gpu_layers=0)
    try:
        assert weight_pages.file_mappings(m.file) == []
    finally:
        m.close()
