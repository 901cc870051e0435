"""vaekit's modules import one another without a cycle, lazy (function-level) imports included.

The graph is read from the source with `ast`: every `import` and `from ... import` anywhere in a module,
inside functions too (a cycle that only closes at call time is still a cycle in the design), relative
imports resolved, `from . import x` counted as the submodule x where there is one. Importing `a.b.c`
also runs the package `a.b`'s __init__, so that is an edge too, except from inside `a.b` (its modules are
only reached through it) and for the top package `vaekit` (every module is inside it)."""

from __future__ import annotations

import ast
from pathlib import Path

import vaekit

ROOT = Path(vaekit.__file__).parent


def _modules() -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package (a package is its __init__.py)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("vaekit", *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vaekit modules `name` imports anywhere in its source, as written (resolved to modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x`: x may be a submodule, then that is what is imported
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    g = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path, modules):
            edges.add(target)
            parts = target.split(".")
            for n in range(2, len(parts)):  # the packages that importing `target` initialises
                parent = ".".join(parts[:n])
                if not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
        g[name] = edges - {name}
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `g` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of `g`, each found after cutting the last edge of the ones before: every cycle shows in one."""
    g = {k: set(v) for k, v in g.items()}
    found = []
    while cycle := find_cycle(g):
        found.append(cycle)
        g[cycle[-2]].discard(cycle[-1])
    return found


def test_the_graph_is_read_from_the_source():
    g = graph()
    assert "vaekit.checkpoints" in g["vaekit"]  # `from .checkpoints import load`
    assert "vaekit.config" in g["vaekit.model.ldm"]  # `from ..config import ...`
    assert "vaekit.model.autoencoder" in g["vaekit.model"]  # `from .autoencoder import ...` in __init__
    assert "vaekit.model" in g["vaekit.latents"]  # importing vaekit.model.autoencoder runs vaekit.model
    assert "vaekit.model" not in g["vaekit.model.tiling"]  # ... but not from inside the package
    assert "vaekit.checkpoints" in g["vaekit.latents"]  # a function-level import


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
