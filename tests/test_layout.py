"""The project's own import graph: layers that import only downward, no import circles, no
private name imported across modules.

Read from the source with ``ast`` (nothing is imported): every module of ``probe/``, ``reports/``
and ``dashboards/`` (installed as ``probe.reports`` and ``probe.dashboards``), with its top-level
imports, those inside functions (a lazy import that hides a circle is a circle still) and those
under ``if TYPE_CHECKING:`` (a circle for the type checker is a circle of the design).
"""

from __future__ import annotations

import ast
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("probe", "reports", "dashboards")
#: the folder of each package in the repository -> its import name (reports/ installs as probe.reports)
IMPORT_NAMES = {"probe": "probe", "reports": "probe.reports", "dashboards": "probe.dashboards"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted import name -> source file of every module of the project's packages."""
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root / pkg).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([IMPORT_NAMES[pkg], *parts])] = f
    return mods


def _is_module(name: str, mods: dict[str, Path], root: Path) -> bool:
    """A project module, or a compiled one (``probe.recording._hooks``, built from ``_hooks.c``)."""
    if name in mods:
        return True
    *pkg, leaf = name.split(".")
    folder = root.joinpath(*pkg) if not pkg or pkg[0] != "probe" or len(pkg) < 2 or pkg[1] not in ("reports", "dashboards") \
        else root.joinpath(*pkg[1:])
    return bool(pkg) and ((folder / f"{leaf}.c").exists()
                          or any((folder / f"{leaf}{s}").exists() for s in EXTENSION_SUFFIXES))


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The project module that ``name`` (a module or a dotted attribute path) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every import statement of a module, at the top, inside functions and for the type checker."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


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
                if source.split(".")[0] != "probe":
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
    assert {"probe", "probe.analysis.run", "probe.analysis.cost", "probe.reports.html", "probe.dashboards.views"} <= set(graph)
    assert "probe.schema" in graph["probe.analysis.run"]  # a top-level import
    assert "probe.analysis.cost" in graph["probe.analysis.run"]  # an import inside Run.cost()
    assert "probe.capture.lifecycle" in graph["probe"]  # under TYPE_CHECKING: counted too


#: the layers, bottom to top: a module imports only from its own layer or those below it.
#: Data flows up: a model's calls are recorded, become frames and a Run, are profiled by the
#: routines and shown by the interfaces.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocabulary", ("probe.version", "probe.errors", "probe.vocab", "probe.roles", "probe.deps", "probe.fmt", "probe.dtypes",
                    "probe.compat", "probe.columns", "probe.derived_schema", "probe.schema", "probe.rules",
                    "probe.parquet_read", "probe.validate")),
    ("store", ("probe.store*",)),
    ("models", ("probe.models*",)),
    ("recording", ("probe.recording*",)),
    ("frames and analysis", ("probe.analysis*",)),
    ("capture", ("probe.capture*",)),
    ("routines", ("probe", "probe.routines*")),
    ("interfaces", ("probe.cli*", "probe.__main__", "probe.reports*", "probe.dashboards*")),
)

#: the modules that may sit at the package's root: the vocabulary every layer shares, the
#: package itself and its ``python -m probe``; everything else lives in its layer's folder.
ROOT_MODULES = {"probe", "probe.__main__", *LAYERS[0][1]}


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the layer that lists ``module`` (``pkg*`` lists a package and
    everything in it); ``None`` if none does."""
    found = None
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m.rstrip("*") or (m.endswith("*") and module.startswith(m[:-1] + ".")):
                found = i
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to one in a higher layer, as text."""
    out = []
    for mod in sorted(graph):
        for target in sorted(graph[mod]):
            lm, lt = layer_of(mod), layer_of(target)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"  {mod} ({LAYERS[lm][0]}) imports {target} ({LAYERS[lt][0]})")
    return out


def test_every_module_has_a_layer():
    graph, _ = import_graph()
    assert not [m for m in graph if layer_of(m) is None], "modules in no layer of LAYERS"


def test_imports_go_only_downward():
    graph, _ = import_graph()
    up = upward_imports(graph)
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


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
    ("if TYPE_CHECKING:\n    from .run import Run\n", True),  # for the type checker: a circle still
    ("from .run import _alive\n", False),
])
def test_the_checks_catch_what_they_are_for(tmp_path, extra, circle):
    for pkg in PACKAGES:  # a copy of the tree with one module changed
        for f in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    cost = tmp_path / "probe" / "analysis" / "cost.py"
    cost.write_text(cost.read_text(encoding="utf-8") + "\n\n" + extra, encoding="utf-8")
    graph, private = import_graph(tmp_path)
    if circle:
        assert any({"probe.analysis.cost", "probe.analysis.run"} <= set(c) for c in cycles(graph))
    else:
        assert ("probe.analysis.cost", "_alive", "probe.analysis.run") in [(m, n, s) for m, _, n, s in private]


def test_the_layer_check_catches_an_upward_import(tmp_path):
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    hot = tmp_path / "probe" / "recording" / "hotpath.py"  # the hot path (recording) reaching up to the frames
    hot.write_text(hot.read_text(encoding="utf-8") + "\n\ndef f():\n    from ..analysis.run import Run\n", encoding="utf-8")
    graph, _ = import_graph(tmp_path)
    assert any("probe.recording.hotpath (recording) imports probe.analysis.run" in line for line in upward_imports(graph))


def test_the_tree_shows_the_layers():
    """Every module outside the shared vocabulary lives in its layer's folder, and each layer
    folder holds one layer: the flow reads from the tree."""
    flat = sorted(m for m, path in project_modules().items()
                  if path.parent == ROOT / "probe" and path.name != "__init__.py" and m not in ROOT_MODULES)
    assert not flat, f"modules at the package root that belong in a layer folder: {flat}"


#: the longest a module may grow (the C file aside): past it, split it along its seams
MAX_LINES = 450


def test_no_module_is_too_long():
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_old_flat_import_paths_resolve_to_the_same_module():
    """``probe.hardware``, ``from probe.run import load``: the paths of the flat layout keep
    working and give the very module of the layer folder (one object, its own spec)."""
    import importlib
    import warnings

    import probe

    for old, new in probe.MOVED.items():
        if old == "_hooks":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an ImportWarning for __spec__.parent != __package__ fails
            a = importlib.import_module(f"probe.{old}")
        b = importlib.import_module(f"probe.{new}")
        assert a is b and a.__spec__.name == f"probe.{new}" and a.__spec__.parent == a.__package__
    from probe.run import load as old_load

    assert old_load is probe.load
