"""Damaged input files through the CLIs (issue 20): one line naming the file and the fault with exit 2,
or (where the damage lands on bytes a reader may accept) a normal result; never a signal, a hang or
a traceback. Seeded, so every run tries the same cases; the table of what was tried is printed
(pytest -s) and kept in docs/malformed-files.md.

`minicpm-run`, for the tiny model's language model and mmproj: 30 truncations (10 inside the header,
20 in the tensor data) and 200 byte flips (XOR with 1..255) in the header, key/value and tensor-info
region, plus one flip of each of the 24 bytes of magic, version and counts (random flips rarely hit
them). Every byte of that region is given a category by gguf-py's GGUFReader on the intact file (an
independent walk of the format), and the category decides what is acceptable:

- MUST_FAIL: bytes that say how the rest is laid out or where data is (magic, key/value count,
  lengths, shapes, data offsets): exit 2 with one line. A version byte must fail unless it became
  another version with the same layout (2 or 3).
- the rest (names, value types, string bytes, numbers, tensor types, padding, a tensor count, which
  when smaller just hides the last tensors): exit 2 with one line, or a normal answer (exit 0,
  nothing on stderr): a reader may accept them; e.g. a flipped vocabulary string, an F16 tensor read
  as BF16, a key nobody reads.

`minicpm-convert`, on the tiny checkpoint: byte flips in each shard's header (its length and its
JSON) and in the index, and an index that is cut, not JSON, or of the wrong shape: exit 2 with one
line naming the damaged file and nothing written, or a conversion byte-identical to that of the
intact checkpoint (a flip in the shard's metadata or padding, in the index's total size).

All cases run through the CLIs' own code in two worker processes (tests/cli_cases.py, typer's
CliRunner in-process: one interpreter start for hundreds of cases); a representative subset, chosen
to cover every category and outcome, runs again through the real command in a subprocess each, which
must give exactly the same result.
"""

from __future__ import annotations

import collections
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image

from minicpmv.convert.checkpoint import INDEX_FILE
from minicpmv.gguf_info import VERSIONS

from .cli_cases import damage, outputs, remove, sha256

SEED = 20
N_TRUNCATE_HEADER, N_TRUNCATE_DATA, N_FLIPS, N_RUN_SUBPROCESS = 10, 20, 200, 40
N_SHARD_FLIPS, N_INDEX_FLIPS, N_CONVERT_SUBPROCESS = 10, 10, 8
PREAMBLE = ((0, 4, "magic"), (4, 8, "version"), (8, 16, "tensor count"), (16, 24, "key/value count"))
MUST_FAIL = {
    "magic",
    "version (other)",
    "key/value count",
    "key length",
    "string length",
    "array length",
    "tensor name length",
    "tensor shape",
    "tensor offset",
    "truncated",
}
# a smaller tensor count hides the last tensors (llama.cpp then ties the output to the embeddings; the
# mmproj's last tensor is one the runtime recomputes); the rest are values a reader may accept
MAY_ANSWER = {
    "version (same layout)",
    "tensor count",
    "key name",
    "value type",
    "string bytes",
    "number",
    "array item type",
    "tensor name",
    "tensor type",
    "padding",
}
REPO = Path(__file__).resolve().parent.parent
RUN, CONVERT = "minicpmv.cli.run", "minicpmv.cli.convert"


# --------------------------------------------------------------------------- minicpm-run: what each byte is


def byte_categories(path: Path) -> list[str]:
    """The category of every byte before the tensor data, from gguf-py's reader of the intact file."""
    r = gguf.GGUFReader(str(path))
    base = r.data.__array_interface__["data"][0]
    cat: list[str | None] = [None] * r.data_offset

    def mark(part: np.ndarray, what: str) -> None:
        start = part.__array_interface__["data"][0] - base
        for i in range(start, start + part.nbytes):
            assert cat[i] is None, f"byte {i} is {cat[i]} and {what}"
            cat[i] = what

    for start, stop, what in PREAMBLE:
        cat[start:stop] = [what] * (stop - start)
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        p = f.parts
        mark(p[0], "key length"), mark(p[1], "key name"), mark(p[2], "value type")
        rest = p[3:]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            mark(rest[0], "array item type"), mark(rest[1], "array length")
            rest = rest[2:]
        if f.types[-1] == gguf.GGUFValueType.STRING:
            for length, text in zip(rest[::2], rest[1::2]):
                mark(length, "string length"), mark(text, "string bytes")
        else:
            for values in rest:
                mark(values, "number")
    for t in r.tensors:
        for part, what in zip(
            t.field.parts,
            ("tensor name length", "tensor name", "tensor shape", "tensor shape", "tensor type", "tensor offset"),
        ):
            mark(part, what)
    return [c or "padding" for c in cat]


def run_cases(kind: str, src: Path, other: Path, pic: Path, work: Path) -> list[dict]:
    """Truncations and flips of `src` (the file of `kind`: "language model" or "mmproj")."""
    rng = np.random.default_rng([SEED, len(kind)])
    cats = byte_categories(src)
    header, size = len(cats), src.stat().st_size
    lm, mm = (src, other) if kind == "language model" else (other, src)
    out = []

    def add(name: str, category: str, spec: dict) -> None:
        dst = work / f"{kind.replace(' ', '-')}-{len(out)}.gguf"
        args = [
            "--model",
            str(dst if src == lm else lm),
            "--mmproj",
            str(dst if src == mm else mm),
            str(pic),
            "What is in the picture?",
            "--max-tokens",
            "2",
            "--greedy",
            "--threads",
            "1",
            "--vision-dtype",
            "f32",
        ]
        out.append(
            {
                "id": f"{kind} {name}",
                "app": RUN,
                "kind": kind,
                "category": category,
                "names": str(dst),
                "args": args,
                "damage": {"src": str(src), "dst": str(dst), **spec},
            }
        )

    cuts = sorted(
        rng.choice(np.arange(1, header), N_TRUNCATE_HEADER, replace=False).tolist()
        + rng.choice(np.arange(header, size), N_TRUNCATE_DATA, replace=False).tolist()
    )
    for n in cuts:
        add(f"cut at {n}", "truncated", {"truncate": n})
    flips = [int(rng.integers(0, header)) for _ in range(N_FLIPS)] + list(range(PREAMBLE[-1][1]))
    version = int.from_bytes(src.read_bytes()[4:8], "little")
    for k, off in enumerate(flips):
        x = int(rng.integers(1, 256))
        category = cats[off]
        if category == "version":  # one little-endian uint32
            category = "version (same layout)" if version ^ (x << 8 * (off - 4)) in VERSIONS else "version (other)"
        add(f"flip {k}: byte {off} ^ {x:#04x}", category, {"offset": off, "xor": x})
    return out


def run_outcome(case: dict, res: dict) -> str:
    """ "error" or "answer" of a minicpm-run case; anything else fails with the case named."""
    where = f"{case['id']} ({case['category']})"
    if res["exit"] == 0:
        assert res["stderr"] == "" and res["stdout"].strip(), f"{where}: exit 0 with {res}"
        return "answer"
    line = one_error_line(res, where, "minicpm-run")
    # naming the damaged file once: one message, not "not a GGUF file (... not a GGUF file (..."
    assert line.count(case["names"]) == 1, f"{where}: {line}"
    if case["category"] == "truncated":
        assert "truncated" in line, f"{where}: {line}"
    if case["category"] == "magic":
        assert "not a GGUF file (starts with " in line, f"{where}: {line}"
    return "error"


def allowed(category: str) -> set[str]:
    if category in MUST_FAIL:
        return {"error"}
    assert category in MAY_ANSWER, category
    return {"error", "answer"}


# --------------------------------------------------------------------------- minicpm-convert


def convert_cases(ckpt: Path, work: Path) -> list[dict]:
    """Flips in each shard's header and in the index, and index files of the wrong kind."""
    rng = np.random.default_rng([SEED, 1])
    out = []

    def add(name: str, file: str, category: str, spec: dict) -> None:
        dst, res = work / f"ckpt-{len(out)}", work / f"out-{len(out)}"
        out.append(
            {
                "id": f"{file} {name}",
                "app": CONVERT,
                "kind": "checkpoint",
                "category": category,
                "names": file,
                "out": str(res),
                "args": [
                    str(dst),
                    "-o",
                    str(res),
                    "--quant",
                    "Q8_0",
                    "--mmproj-type",
                    "f16",
                    "--threads",
                    "1",
                    "--quiet",
                ],
                "damage": {"folder": True, "src": str(ckpt), "dst": str(dst), "file": file, **spec},
            }
        )

    for shard in sorted(ckpt.glob("model-*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        for k in range(N_SHARD_FLIPS):
            off = int(rng.integers(0, 8 + n))
            add(
                f"flip {k}: byte {off}",
                shard.name,
                "shard header length" if off < 8 else "shard header JSON",
                {"offset": off, "xor": int(rng.integers(1, 256))},
            )
    index = (ckpt / INDEX_FILE).read_bytes()
    for k in range(N_INDEX_FLIPS):
        add(
            f"flip {k}",
            INDEX_FILE,
            "index flip",
            {"offset": int(rng.integers(0, len(index))), "xor": int(rng.integers(1, 256))},
        )
    weight_map = json.loads(index)["weight_map"]
    first = next(iter(weight_map))
    for name, content in (
        ("cut in half", index[: len(index) // 2]),
        ("binary bytes before the JSON", b"\xff\xfe" + index),
        ("a JSON list", b"[]"),
        ("weight_map a list", json.dumps({"weight_map": list(weight_map)}).encode()),
        (
            "a shard outside the folder",
            json.dumps({"weight_map": weight_map | {first: "../" + weight_map[first]}}).encode(),
        ),
    ):
        add(name, INDEX_FILE, f"index: {name}", {"content_hex": content.hex()})
    return out


def convert_outcome(case: dict, res: dict, intact: dict[str, str]) -> str:
    """ "error" (one line naming the damaged file, nothing written) or "converted" (exactly what the
    intact checkpoint converts to)."""
    where = case["id"]
    if res["exit"] == 0:
        assert res["outputs"] == intact, f"{where}: converted, but not to what the intact checkpoint gives"
        assert res["stderr"] == "", f"{where}: {res['stderr']}"
        return "converted"
    line = one_error_line(res, where, "minicpm-convert")
    assert case["names"] in line, f"{where}: {line}"
    assert res["outputs"] == {}, f"{where}: wrote {res['outputs']}"
    return "error"


# --------------------------------------------------------------------------- running them


def one_error_line(res: dict, where: str, prog: str) -> str:
    assert res.get("exception") is None, f"{where}: traceback: {res['exception']}"
    assert res["exit"] == 2, f"{where}: exit {res['exit']}: {res['stderr']}"
    lines = res["stderr"].splitlines()
    assert len(lines) == 1 and res["stdout"] == "", f"{where}: {res}"
    assert lines[0].startswith(f"{prog}: error: "), f"{where}: {lines[0]}"
    return lines[0]


def run_in_workers(cases: list[dict], work: Path, n: int = 2) -> dict[str, dict]:
    """All cases through tests/cli_cases.py, split over `n` worker processes."""

    def worker(i: int) -> list[dict]:
        spec = work / f"cases-{i}.json"
        spec.write_text(json.dumps(cases[i::n]))
        proc = subprocess.run(
            [sys.executable, "-m", "tests.cli_cases", str(spec)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60 * 10,
        )
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"id"')]
        started = [x["id"] for x in lines if x.get("started")]
        assert proc.returncode == 0, (
            f"worker ended with {proc.returncode} during {started[-1] if started else '?'}: {proc.stderr[:2000]}"
        )  # ggml's assertion comes first, then a backtrace
        return [x for x in lines if not x.get("started")]

    with ThreadPoolExecutor(n) as ex:
        results = {r["id"]: r for rs in ex.map(worker, range(n)) for r in rs}
    assert len(results) == len(cases)
    return results


def run_command(case: dict) -> dict:
    """The case through the real command (`python -m` the CLI module: its entry point), a process each."""
    made = damage(case["damage"])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", case["app"], *case["args"]], capture_output=True, text=True, timeout=120
        )
    finally:
        remove(made)
    assert proc.returncode >= 0, f"{case['id']}: killed by signal {-proc.returncode}"
    return {"exit": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "outputs": outputs(case)}


def same_in_subprocesses(cases: list[dict], outcomes: dict[str, str], results: dict[str, dict], n: int) -> None:
    """`n` cases covering every (file, category, outcome) group, round robin, seeded, through the real
    command: exactly the result of the in-process run."""
    groups = collections.defaultdict(list)
    for c in cases:
        groups[(c["kind"], c["category"], outcomes[c["id"]])].append(c)
    rng = np.random.default_rng(SEED)
    queues = [list(rng.permutation(g)) for _, g in sorted(groups.items())]
    sample: list[dict] = []
    while len(sample) < n and any(queues):
        for q in queues:
            if q and len(sample) < n:
                sample.append(q.pop())
    assert len(sample) == n
    with ThreadPoolExecutor(2) as ex:
        for case, got in zip(sample, ex.map(run_command, sample)):
            want = {k: results[case["id"]][k] for k in got}
            assert got == want, f"{case['id']}: the real command differs from the in-process run"


def table(cases: list[dict], outcomes: dict[str, str], results: dict[str, dict], columns: tuple[str, str]) -> str:
    """Counts per (file, damage, outcome), with the first error message of each row (paths cut to
    file names)."""
    counts = collections.Counter((c["kind"], c["category"], outcomes[c["id"]]) for c in cases)
    example: dict[tuple[str, str], str] = {}
    for c in cases:
        err = results[c["id"]]["stderr"].strip()
        if err and (c["kind"], c["category"]) not in example:
            dst = Path(c["damage"]["dst"])
            folder = dst if c["damage"].get("folder") else dst.parent
            example[(c["kind"], c["category"])] = err.split(": error: ", 1)[1].replace(f"{folder}/", "")[:110]
    rows = [f"| file | damage | cases | {' | '.join(columns)} | first message |", "|---|---|---:|---:|---:|---|"]
    ok = "answer" if columns[1] == "normal answer" else "converted"
    for kind in dict.fromkeys(c["kind"] for c in cases):
        for cat in sorted({cat for k, cat, _ in counts if k == kind}, key=lambda c: (c != "truncated", c)):
            n = [counts[(kind, cat, o)] for o in ("error", ok)]
            msg = example.get((kind, cat), "").replace("|", "\\|")
            rows.append(f"| {kind} | {cat} | {sum(n)} | {n[0]} | {n[1]} | {f'`{msg}`' if msg else ''} |")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def pic(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fuzz-pic") / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    return p


def test_damaged_model_files(tiny_lm_gguf, tiny_mmproj_gguf, pic, tmp_path):
    lm, mm = tiny_lm_gguf("F32"), tiny_mmproj_gguf("f32")
    cases = run_cases("language model", lm, mm, pic, tmp_path) + run_cases("mmproj", mm, lm, pic, tmp_path)
    assert sum(c["category"] == "truncated" for c in cases) == 2 * (N_TRUNCATE_HEADER + N_TRUNCATE_DATA)
    results = run_in_workers(cases, tmp_path)
    outcomes = {c["id"]: run_outcome(c, results[c["id"]]) for c in cases}
    print("\n" + table(cases, outcomes, results, ("exit 2, one line", "normal answer")))
    wrong = [
        f"{c['id']} ({c['category']}): {outcomes[c['id']]}: {results[c['id']]['stdout'][:80]!r}"
        for c in cases
        if outcomes[c["id"]] not in allowed(c["category"])
    ]
    assert not wrong, "\n".join(wrong)
    same_in_subprocesses(cases, outcomes, results, N_RUN_SUBPROCESS)


def test_damaged_checkpoints(tiny_ckpt, tmp_path):
    from minicpmv.convert.pipeline import convert

    res = convert(tiny_ckpt, tmp_path / "intact", quant_type="Q8_0", mmproj_type="f16", threads=1, progress=False)
    intact = {p.name: sha256(p) for p in (res.lm_path, res.mmproj_path)}
    cases = convert_cases(tiny_ckpt, tmp_path)
    results = run_in_workers(cases, tmp_path)
    outcomes = {c["id"]: convert_outcome(c, results[c["id"]], intact) for c in cases}
    print("\n" + table(cases, outcomes, results, ("exit 2, one line, nothing written", "converted, identical")))
    same_in_subprocesses(cases, outcomes, results, N_CONVERT_SUBPROCESS)
