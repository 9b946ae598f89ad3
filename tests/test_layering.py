"""The package's import layering, read from the source with ``ast`` (nothing is imported):

* no import cycle between two modules of ``iv2_lightning``, counting the imports inside functions
  (a lazy import that closes a cycle only hides it until the call);
* ``iv2_lightning.data`` never imports ``iv2_lightning.models``: both use the tokenizers and the fbank
  from ``iv2_lightning.features`` (DESIGN.md, "data/ and models/ share tokenizers and fbank through a
  small module both import; no import cycles");
* nothing that ``iv2_lightning.models`` or ``iv2_lightning.features`` imports, directly or through
  other package modules, imports Lightning (DESIGN.md, "NO lightning import anywhere under models/").

Imports under ``if TYPE_CHECKING:`` never run and are left out. Importing ``a.b.c`` also runs the
package ``a.b``'s ``__init__``; that implicit edge is left out too, since a package that imports its
own submodules would otherwise be a cycle with each of them (``from a.b import x`` is an edge to
``a.b``, and so a real one).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "iv2_lightning"
LIGHTNING_ROOTS = ("lightning", "pytorch_lightning", "lightning_fabric")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body

    def __str__(self) -> str:
        where = "in a function, " if self.lazy else ""
        return f"{self.source} -> {self.target} ({where}line {self.line})"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import statement of one module with its line and whether it sits in a function."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._depth = 0

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # annotations only: never executed
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, self._depth > 0))

    visit_ImportFrom = visit_Import


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(package_dir: Path) -> tuple[dict[str, list[Edge]], dict[str, list[tuple[str, int]]]]:
    """(edges between package modules, third-party top-level names each module imports with the line)."""
    files = module_files(package_dir)
    edges: dict[str, list[Edge]] = {m: [] for m in files}
    external: dict[str, list[tuple[str, int]]] = {m: [] for m in files}
    for module, path in files.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for node, lazy in visitor.found:
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _absolute(node, module, path.name == "__init__.py")
                # `from pkg import sub` imports the submodule when there is one, else names from pkg
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for target in dict.fromkeys(targets):
                if target in files:
                    if target != module:
                        edges[module].append(Edge(module, target, node.lineno, lazy))
                elif target.split(".")[0] != package_dir.name:
                    external[module].append((target.split(".")[0], node.lineno))
    return edges, external


def strongly_connected(edges: dict[str, list[Edge]]) -> list[frozenset[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted({e.target for e in edges[root]})))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted({e.target for e in edges[succ]}))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def one_cycle(edges: dict[str, list[Edge]], component: frozenset[str]) -> list[Edge]:
    """A shortest import cycle through the component's first module, edge by edge (for the message)."""
    start = min(component)
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for edge in edges[node]:
                if edge.target == start:
                    return [*paths[node], edge]
                if edge.target in component and edge.target not in paths:
                    paths[edge.target] = [*paths[node], edge]
                    nxt.append(edge.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def reachable(edges: dict[str, list[Edge]], roots: list[str]) -> dict[str, list[Edge]]:
    """Every module imported from ``roots`` (themselves included), each with the chain that reaches it."""
    chains: dict[str, list[Edge]] = {r: [] for r in roots}
    frontier = list(roots)
    while frontier:
        node = frontier.pop()
        for edge in edges[node]:
            if edge.target not in chains:
                chains[edge.target] = [*chains[node], edge]
                frontier.append(edge.target)
    return chains


def describe(component: frozenset[str], edges: dict[str, list[Edge]]) -> str:
    path = "; ".join(str(e) for e in one_cycle(edges, component))
    return f"{sorted(component)}: {path}"


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR)


def test_the_graph_reads_the_package(graph):
    edges, external = graph
    assert len(edges) > 40 and "iv2_lightning.models.backbone" in edges
    backbone = {e.target for e in edges["iv2_lightning.models.backbone"]}
    assert {"iv2_lightning.models.attention", "iv2_lightning.models.layers"} <= backbone
    assert any(name == "torch" for name, _ in external["iv2_lightning.models.backbone"])


def test_no_import_cycles_between_package_modules(graph):
    edges, _ = graph
    cycles = strongly_connected(edges)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, edges) for c in cycles)


def test_data_does_not_import_models(graph):
    edges, _ = graph
    bad = [
        str(e)
        for module, out in edges.items()
        if module.startswith("iv2_lightning.data")
        for e in out
        if e.target == "iv2_lightning.models" or e.target.startswith("iv2_lightning.models.")
    ]
    assert not bad, "data/ imports models/ (use iv2_lightning.features):\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", ["iv2_lightning.models", "iv2_lightning.features"])
def test_torch_layers_do_not_reach_lightning(graph, layer):
    """No module of the layer imports Lightning, nor does any package module it imports; and
    features/ imports neither data/ nor models/."""
    edges, external = graph
    roots = [m for m in edges if m == layer or m.startswith(layer + ".")]
    assert roots
    chains = reachable(edges, roots)
    bad = []
    for module, chain in sorted(chains.items()):
        for name, line in external[module]:
            if name in LIGHTNING_ROOTS:
                via = " via " + "; ".join(map(str, chain)) if chain else ""
                bad.append(f"{module} line {line} imports {name}{via}")
    assert not bad, "\n".join(bad)
    if layer == "iv2_lightning.features":
        above = [m for m in chains if m.startswith(("iv2_lightning.data", "iv2_lightning.models"))]
        assert not above, f"features/ must import neither data/ nor models/: {above}"


# ------------------------------------------------------------- the checks fail when they should


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checks_find_lazy_cycles_relative_imports_and_indirect_lightning(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\n",  # a package importing its submodule: no cycle
            "pkg/a.py": "import os\n\ndef f():\n    from pkg import b  # lazy\n",
            "pkg/b.py": "from .sub.c import C\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import f\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
            "pkg/d.py": "import pkg.c2\n",
            "pkg/c2.py": "import pkg.d\nimport lightning.pytorch as L\n",
            "pkg/models/__init__.py": "",
            "pkg/models/m.py": "from pkg import e\n",
            "pkg/e.py": "import pytorch_lightning\n",
        },
    )
    edges, external = import_graph(pkg)
    found = strongly_connected(edges)
    assert set(found) == {
        frozenset({"pkg.a", "pkg.b", "pkg.sub.c"}),
        frozenset({"pkg.d", "pkg.c2"}),
    }
    cycle = one_cycle(edges, frozenset({"pkg.a", "pkg.b", "pkg.sub.c"}))
    assert [str(e) for e in cycle] == [
        "pkg.a -> pkg.b (in a function, line 4)",
        "pkg.b -> pkg.sub.c (line 1)",
        "pkg.sub.c -> pkg.a (line 1)",
    ]
    assert ("lightning", 2) in external["pkg.c2"]
    chains = reachable(edges, ["pkg.models.m"])
    assert "pkg.e" in chains and ("pytorch_lightning", 1) in external["pkg.e"]
