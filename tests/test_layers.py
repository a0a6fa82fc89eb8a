"""The package's layering: no import cycle, and the lower layers know nothing of the ones above.

Read from the source (every ``import`` and ``from ... import``, at module level or inside a
function), so a lazy import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mauctl

PACKAGE = Path(mauctl.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each mauctl module -> the mauctl modules it imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that lies on one (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"mauctl.cli", "mauctl.worker", "mauctl.launch", "mauctl.pretrain", "mauctl.engine.checkpoint"} <= set(graph)
    assert "mauctl.launch" in graph["mauctl.worker"]  # imports inside functions count


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_lower_layers_import_nothing_above_them():
    graph = import_graph()
    allowed = {
        # the engine knows nothing of MoCo, linear probes or the commands
        "mauctl.engine": {"mauctl", "mauctl.config", "mauctl.errors", "mauctl.files", "mauctl.text"},
        # the launcher starts `python -m mauctl.worker` by name; it never imports the worker or a job
        "mauctl.launch": {"mauctl.config", "mauctl.errors", "mauctl.text", "mauctl.engine.rundir"},
        # the loss terms are pure tensor functions
        "mauctl.losses": set(),
    }
    for prefix, ok in allowed.items():
        for module, imports in graph.items():
            if module == prefix or module.startswith(prefix + "."):
                outside = {i for i in imports if i != prefix and not i.startswith(prefix + ".") and i not in ok}
                assert not outside, f"{module} imports {sorted(outside)}"
