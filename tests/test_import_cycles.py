"""No import circles in src/gguf_factory (DESIGN.md: lower floors never import higher ones).

Every ``import`` statement counts as an edge, at module level, inside functions and under
``TYPE_CHECKING`` alike; an import of a package's name (``from . import register``) is an edge to the
package's ``__init__``, an import of a submodule an edge to that submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "gguf_factory"

# Edges left to break; each names why it is still here. Empty is the goal.
ALLOWED: set[tuple[str, str]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in (SRC / PKG).rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (p, is_pkg)
    return mods


def _targets(mods: dict[str, tuple[Path, bool]], mod: str, is_pkg: bool, node: ast.AST) -> list[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".")[: None if is_pkg else -1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    out = []
    for name in names:
        if not (name == PKG or name.startswith(PKG + ".")):
            continue
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            edges[mod].update(t for t in _targets(mods, mod, is_pkg, node) if t != mod)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_graph_sees_known_edges():
    edges = import_graph()
    assert "gguf_factory.errors" in edges["gguf_factory.quantize"]
    assert "gguf_factory.imatrix" in edges["gguf_factory.quantize"]  # a function-level import
    assert "gguf_factory.scoring" in edges["gguf_factory.bench"]  # a TYPE_CHECKING import


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    edges = import_graph()
    for a, b in ALLOWED:
        edges[a].discard(b)
    found = cycles(edges)
    detail = [
        f"{sorted(c)}: " + ", ".join(f"{a} -> {b}" for a in sorted(c) for b in sorted(edges[a]) if b in c)
        for c in found
    ]
    assert not found, "import circles:\n" + "\n".join(detail)
