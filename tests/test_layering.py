"""The package's import graph: no import loops (imports inside functions included, since a loop
broken by a deferred import is still a loop) and no module importing another module's private
names. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "medsam").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import in the module, at any depth,
    except those under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, None) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.append((submodule, None) if submodule in MODULES else (target, alias.name))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {t for t, _ in _imports(name, path) if t in MODULES and t != name}
        # a package and its own submodules (lazy re-exports in __init__) are one unit
        graph[name] = {t for t in targets if not t.startswith(name + ".") and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_finder_sees_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops():
    graph = _graph()
    assert len(graph) > 100  # the whole package was read
    assert "medsam.default_model" in graph["medsam.weights"]  # imports inside functions are seen too
    assert _cycles(graph) == []


def test_no_private_names_from_other_modules():
    """``from .x import _name`` only where ``_name`` is a private submodule of the same package."""
    offenders = [
        (name, target, imported)
        for name, path in MODULES.items()
        for target, imported in _imports(name, path)
        if imported and imported.startswith("_") and not imported.startswith("__") and target.startswith("medsam")
    ]
    assert offenders == []


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_inference_does_not_import_curation():
    """Segmenting a file (CLI, library, workbench) needs no part of the corpus-building package:
    intensity normalisation lives in ``medsam.intensity``, which both use."""
    graph = _graph()
    for entry in ("medsam.segment", "medsam.predictor", "medsam.volume", "medsam.server.routers.images"):
        curation = sorted(m for m in _reaches(graph, entry) if m.startswith("medsam.curate"))
        assert curation == [], (entry, curation)
    assert "medsam.intensity" in _reaches(graph, "medsam.segment")
    assert "medsam.intensity" in _reaches(graph, "medsam.curate.prepare")
