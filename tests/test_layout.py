"""The project's own import graph: no import circles, no private name imported across modules.

Read from the source with ``ast`` (nothing is imported): every module of ``probe/``, ``reports/``
and ``dashboards/``, with its top-level imports and those inside functions alike (a lazy import
that hides a circle is a circle still). Imports under ``if TYPE_CHECKING:`` run only for the
type checker and are left out.
"""

from __future__ import annotations

import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probe", "reports", "dashboards")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> source file of every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


def _is_module(name: str, mods: dict[str, Path], root: Path) -> bool:
    """A project module, or a compiled one (``probe._hooks``, built from ``_hooks.c``)."""
    if name in mods:
        return True
    *pkg, leaf = name.split(".")
    folder = root.joinpath(*pkg)
    return bool(pkg) and ((folder / f"{leaf}.c").exists()
                          or any((folder / f"{leaf}{s}").exists() for s in EXTENSION_SUFFIXES))


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The project module that ``name`` (a module or a dotted attribute path) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every import statement of a module that runs (not under ``if TYPE_CHECKING:``)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[tuple[str, int, str, str]]]:
    """(module -> project modules it imports, [(module, line, private name, source module), ...])."""
    mods = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, int, str, str]] = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [_owner(a.name, mods) for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] not in PACKAGES:
                    continue
                targets = []
                for a in node.names:
                    full = f"{source}.{a.name}"
                    if _is_module(full, mods, root):
                        targets.append(full if full in mods else None)  # a compiled module: no edges
                        continue
                    targets.append(_owner(source, mods))
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append((mod, node.lineno, a.name, source))
            graph[mod].update(t for t in targets if t and t != mod)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_every_package_and_lazy_imports():
    graph, _ = import_graph()
    assert {"probe", "probe.run", "probe.cost", "reports.html", "dashboards.views"} <= set(graph)
    assert "probe.schema" in graph["probe.run"]  # a top-level import
    assert "probe.cost" in graph["probe.run"]  # an import inside Run.cost()
    assert "probe.capture" not in graph["probe"]  # under TYPE_CHECKING only


def test_no_import_circles():
    graph, _ = import_graph()
    circles = cycles(graph)
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
              for c in circles]
    assert not circles, "modules that import each other (directly or around a loop):\n" + "\n".join(detail)


def test_no_private_name_imported_from_another_module():
    _, private = import_graph()
    assert not private, "private names imported across modules (make them public, or move them):\n" + "\n".join(
        f"  {m}:{line} imports {name} from {src}" for m, line, name, src in private)


@pytest.mark.parametrize("extra, circle", [
    ("from .run import load\n", True),  # cost imports run, and Run.cost() imports cost
    ("def f():\n    from . import run\n", True),  # lazily: a circle still
    ("from .run import _alive\n", False),
])
def test_the_checks_catch_what_they_are_for(tmp_path, extra, circle):
    for pkg in PACKAGES:  # a copy of the tree with one module changed
        for f in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    cost = tmp_path / "probe" / "cost.py"
    cost.write_text(cost.read_text(encoding="utf-8") + "\n\n" + extra, encoding="utf-8")
    graph, private = import_graph(tmp_path)
    if circle:
        assert any({"probe.cost", "probe.run"} <= set(c) for c in cycles(graph))
    else:
        assert ("probe.cost", "_alive", "probe.run") in [(m, n, s) for m, _, n, s in private]
