"""The modules of sam_jax import one another without a circle.

A circle between modules is a layout smell (two modules that are really one, or a shared piece
with no home of its own) and, at import time, a trap: whichever module Python happens to load
first sees the other half-initialised. The graph is read from the source with `ast`, so it holds
every import, also the ones inside functions (a lazy import still ties the two modules
together); only imports under `if TYPE_CHECKING:` are left out, since they never run.

Edges: `import a.b` and `from a import b` where `a.b` is a module point at `a.b`; `from a import
name` for any other name points at `a` (its `__init__` when `a` is a package). Python also runs
a package's `__init__` before any of its submodules, but that implicit edge is not drawn: with
it, every package whose `__init__` gathers its submodules would be a circle.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "sam_jax"

Sources = Dict[str, Tuple[str, bool]]  # module name -> (source text, is a package __init__)


def package_sources(root: str = ROOT, package: str = PACKAGE) -> Sources:
    """Every module under `root/package`, by dotted name."""
    out: Sources = {}
    for folder, dirs, files in os.walk(os.path.join(root, package)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        rel = os.path.relpath(folder, root).split(os.sep)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            is_package = name == "__init__.py"
            dotted = ".".join(rel if is_package else rel + [name[:-3]])
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out[dotted] = (f.read(), is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The dotted names one module imports, as (base, [imported names]) pairs."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: List[Tuple[str, List[Optional[str]]]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: only the else branch counts
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [None]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            if node.level - 1 >= len(parts):
                raise ValueError(f"relative import beyond the top package in {self.package}")
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            if node.module:
                base += "." + node.module
        else:
            base = node.module or ""
        self.found.append((base, [alias.name for alias in node.names]))


def import_graph(sources: Sources, package: str = PACKAGE) -> Dict[str, Set[str]]:
    """module -> the modules of `package` it imports (see the module docstring for the rules)."""
    def known(name: str) -> Optional[str]:
        # `import a.b.c` of a module; else the longest prefix that is one
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: Dict[str, Set[str]] = {}
    for module, (text, is_package) in sources.items():
        visitor = _Imports(module, is_package)
        visitor.visit(ast.parse(text, filename=module))
        edges: Set[str] = set()
        for base, names in visitor.found:
            if base != package and not base.startswith(package + "."):
                continue
            for name in names:
                full = f"{base}.{name}" if name and name != "*" else base
                target = full if full in sources else known(base)
                if target is not None and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One circle as [m0, m1, ..., m0], or None. Depth-first, iterative, in sorted order so a
    failure always names the same circle."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {node: WHITE for node in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        color[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = BLACK
                stack.pop()
                continue
            state = color.get(nxt, BLACK)  # an edge out of the graph cannot close a circle
            if state == GREY:
                return path[path.index(nxt):] + [nxt]
            if state == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


# ---- the finder itself (so that a passing check below means something) ---------------------

def test_find_cycle_reports_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    graph["c"] = {"d"}
    assert find_cycle(graph) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_import_graph_rules():
    sources: Sources = {
        "pkg": ("from . import sub\nfrom .util import helper\n", True),
        "pkg.sub": ("import os\n"
                    "def f():\n    from . import other  # lazy: still an edge\n", False),
        "pkg.other": ("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from .sub import f\n"
                      "else:\n    from . import util\n"
                      "from . import VERSION\n", False),
        "pkg.util": ("import pkg.inner.deep\nfrom pkg import *\n", False),
        "pkg.inner": ("", True),
        "pkg.inner.deep": ("from .. import util\n", False),
    }
    graph = import_graph(sources, package="pkg")
    assert graph == {
        "pkg": {"pkg.sub", "pkg.util"},
        "pkg.sub": {"pkg.other"},
        "pkg.other": {"pkg.util", "pkg"},  # TYPE_CHECKING skipped; VERSION is no module
        "pkg.util": {"pkg.inner.deep", "pkg"},
        "pkg.inner": set(),
        "pkg.inner.deep": {"pkg.util"},
    }
    assert find_cycle(graph) == ["pkg", "pkg.sub", "pkg.other", "pkg"]


# ---- sam_jax -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    return import_graph(package_sources())


def test_graph_is_read(graph):
    # the walk found the package and its imports (an empty graph would pass anything)
    assert "sam_jax.inference" in graph["sam_jax"]
    assert "sam_jax.modeling" in graph["sam_jax.build_sam"]


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cli_commands_import_only_common(graph):
    # one module per command; what they share is in cli.common, composed by cli/__init__.py
    commands = [m for m in graph if m.startswith("sam_jax.cli.")
                and m not in ("sam_jax.cli.common", "sam_jax.cli.__main__")]
    assert commands, "no command modules found"
    for module in commands:
        inside = {m for m in graph[module] if m == "sam_jax.cli" or m.startswith("sam_jax.cli.")}
        assert inside <= {"sam_jax.cli.common"}, f"{module} imports {sorted(inside)}"


def test_checkpoints_modules_do_not_import_their_package(graph):
    # only sam_jax/checkpoints/__init__.py composes the pieces; a piece importing it back
    # would make the package's import order matter
    pieces = [m for m in graph if m.startswith("sam_jax.checkpoints.")]
    assert "sam_jax.checkpoints.errors" in pieces
    for module in pieces:
        assert "sam_jax.checkpoints" not in graph[module], module
