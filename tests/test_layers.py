"""The package's import graph runs one way (docs/architecture.md §0): front ends -> session ->
engine -> format. Every import of every module is read from its source (function-level imports
too), so a lower layer importing a higher one, two packages of one layer importing each other, or
any import cycle fails here, with the modules named."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent

# package -> layer; a module may import its own package and any lower layer, nothing else
LAYERS = {
    "minicpmv": 0,  # format: schema, gguf_info, cpu, sincos
    "minicpmv.quant": 1,  # the quantizer library (ggml kernels, llama.cpp's type rules)
    "minicpmv.runtime": 1,  # the engine
    "minicpmv.convert": 2,  # checkpoint -> GGUF (uses quant)
    "minicpmv.hub": 2,  # where model files come from
    "minicpmv.session": 3,  # what the front ends share
    "minicpmv.server": 4,  # the HTTP front end
    "minicpmv.cli": 5,  # the commands (may start the server)
}


def package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: REPO / d for pkg, d in cfg["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in package_dirs().items():
        for f in d.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (`from x import y` counts x.y when that is a module)."""
    is_pkg = path.stem == "__init__"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            subs = [f"{mod}.{a.name}" for a in node.names]
            # `from pkg import module` imports the module; other names come from pkg itself
            targets = subs + ([mod] if not all(s in known for s in subs) else [])
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def package_of(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_package_has_a_layer():
    assert set(package_dirs()) == set(LAYERS)


def test_imports_only_go_down():
    wrong = []
    for m, deps in graph().items():
        pm = package_of(m)
        for d in deps:
            pd = package_of(d)
            if pd != pm and LAYERS[pd] >= LAYERS[pm]:
                wrong.append(f"{m} (layer {LAYERS[pm]}) imports {d} (layer {LAYERS[pd]})")
    assert not wrong, "\n".join(sorted(wrong))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert not cycles(graph())


def test_the_checks_can_fail():
    """The two checks on a made-up graph: an upward import and a cycle are both found."""
    g = {"minicpmv.runtime.a": {"minicpmv.cli.run"}, "minicpmv.cli.run": {"minicpmv.runtime.a"}}
    assert cycles(g) == [["minicpmv.cli.run", "minicpmv.runtime.a"]]
    assert LAYERS[package_of("minicpmv.cli.run")] > LAYERS[package_of("minicpmv.runtime.a")]
    assert package_of("minicpmv.schema") == "minicpmv" and package_of("minicpmv.quant.ggml") == "minicpmv.quant"


def test_files_stay_small():
    """One job per file: none over 350 lines unless its docstring says why ("Size:")."""
    big = []
    for p in modules().values():
        text = p.read_text()
        if text.count("\n") > 350 and "Size:" not in (ast.get_docstring(ast.parse(text)) or ""):
            big.append(f"{p.relative_to(REPO)}: {text.count(chr(10))} lines")
    assert not big, "\n".join(big)
