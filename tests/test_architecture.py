"""Import architecture of tnlm, checked statically on the source with ``ast``.

(a) Layers: a module may import its own package and packages of lower rank;
    ``analysis`` is a side branch that may import only ``core`` and ``_compat``;
    ``textgen`` (the generated text) imports nothing of tnlm.
    ``tnlm/__init__.py`` (the facade) is exempt; importing it counts as importing
    the highest package it imports.
(b) No import cycle between modules (function-level imports included).
(c) No ``from tnlm.x import _private`` from another tnlm module.

Every import of a tnlm module counts, wherever it stands (module level or inside a
function). ``from package import name`` is an import of the submodule when
``package/name.py`` (or ``package/name/``) exists, else of the package itself.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "tnlm"

#: packages (a directory or a single module under tnlm/) from the bottom up
RANK = {
    "_compat": 0,
    "core": 1,
    "textgen": 1,
    "bridge": 2,
    "integration": 3,
    "compress": 4,
    "analysis": 5,
    "export": 5,
    "cli": 6,
    "__main__": 7,
}
#: packages that may import only these packages (besides themselves), whatever their rank
ONLY = {"analysis": {"core", "_compat"}, "textgen": set()}
#: importers not checked by (a)
EXEMPT = {"tnlm"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel).is_dir()


def package(name: str) -> str:
    """``tnlm.core.mpo`` -> ``core``; ``tnlm.cli`` -> ``cli``; ``tnlm`` -> ``tnlm``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every tnlm import in ``name``."""
    path = MODULES[name]
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "tnlm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "tnlm":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if is_module(sub):
                    out.append((sub, None, node.lineno))
                else:
                    out.append((mod, alias.name, node.lineno))
    return out


def where(name: str, line: int) -> str:
    path = MODULES[name]
    return f"{path.relative_to(PKG.parent) if path.is_relative_to(PKG.parent) else path}:{line}"


GRAPH = {name: sorted({m for m, _, _ in imports(name)}) for name in MODULES}


def rank(name: str) -> float:
    """The rank of a module's package; the facade ``tnlm`` ranks as the highest it imports."""
    pkg = package(name)
    if pkg == "tnlm":
        return max((rank(m) for m in GRAPH[name] if package(m) != "tnlm"), default=-1)
    return RANK[pkg]


def test_every_package_has_a_rank():
    unknown = {package(m) for m in MODULES} - set(RANK) - EXEMPT
    assert not unknown, f"give these tnlm packages a place in RANK: {sorted(unknown)}"


def layer_violations() -> list[str]:
    bad = []
    for name in MODULES:
        src = package(name)
        if src in EXEMPT or src not in RANK:
            continue
        for mod, _, line in imports(name):
            dst = package(mod)
            if dst == src:
                continue
            ok = dst in ONLY[src] if src in ONLY else rank(mod) < RANK[src]
            if not ok:
                bad.append(f"{where(name, line)} ({src}) imports {mod}")
    return bad


def test_layers():
    bad = layer_violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, []):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_detection_itself():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["a"]}) == [["a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles between modules:\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def private_imports() -> list[str]:
    bad = []
    for name in MODULES:
        for mod, imported, line in imports(name):
            if imported and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{where(name, line)} imports {imported} from {mod}")
    return bad


def test_no_private_imports_across_modules():
    bad = private_imports()
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from tnlm.core import MPO", [("tnlm.core", "MPO")]),
    ("from tnlm.core import backend as B", [("tnlm.core.backend", None)]),
    ("import tnlm.core.plan", [("tnlm.core.plan", None)]),
    ("from . import sweeps", [("tnlm.core.sweeps", None)]),
    ("from .plan import _cached", [("tnlm.core.plan", "_cached")]),
    ("def f():\n    from ..bridge import layer", [("tnlm.bridge.layer", None)]),
    ("import numpy\nfrom numpy import _x", []),
])
def test_import_parser(source, expected, tmp_path, monkeypatch):
    """The parser resolves relative, submodule and function-level imports (as if in core/mpo.py)."""
    fake = tmp_path / "mpo.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "tnlm.core.mpo", fake)
    assert [(m, n) for m, n, _ in imports("tnlm.core.mpo")] == expected
