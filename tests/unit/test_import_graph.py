"""No package of the daemon imports, at module level, a package that imports it back.

The graph is of first-level packages (``sidecar.store``, ``sidecar.telemetry``,
...), built from every module's top-level imports (``if TYPE_CHECKING:`` blocks
left out: they never run). A function-level import is how a module defers
something heavy, not how it hides a cycle: those are left out too, and the lazy
package ``__getattr__`` that hid two cycles is gone.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "sidecar"


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        here = _package(module)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "sidecar":
                    targets = [f"sidecar.{a.name}" for a in node.names]
                elif node.module.startswith("sidecar."):
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("sidecar.")]
            for target in targets:
                there = _package(target)
                if there != here:
                    edges[here].add(there)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_daemon_has_no_package_cycle() -> None:
    edges = _graph()
    assert "sidecar.store" in edges  # the walk found the packages
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


#: Imports of another package's private module, each on purpose. The CLI reaches
#: each command's own module so that `atlas-sidecar status` does not import the
#: whole daemon (a package's __init__ imports all of it).
ALLOWED_PRIVATE = {
    ("sidecar/cli.py", "sidecar.gateway._run"),
    ("sidecar/cli.py", "sidecar.rollout._cli"),
    ("sidecar/cli.py", "sidecar.training._cli"),
}


def test_no_package_imports_another_packages_private_module() -> None:
    found = set()
    for path in ROOT.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        rel = path.relative_to(ROOT.parent)
        here = _package(".".join(rel.with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            parts = node.module.split(".")
            if parts[0] != "sidecar" or _package(node.module) == here:
                continue
            if any(p.startswith("_") for p in parts[2:]):
                found.add((str(rel), node.module))
    assert found - ALLOWED_PRIVATE == set(), sorted(found - ALLOWED_PRIVATE)
