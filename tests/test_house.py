"""The shape of the house (docs/architecture.md): no function in pipeline/ longer than MAX_FUNCTION_LINES, no
import cycle between pipeline's modules (lazy imports inside functions included), and no private name imported
from a pipeline module by pipeline/ or cli.py. Read from the source with `ast`: nothing is run."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
MAX_FUNCTION_LINES = 60  # from the `def` line to the body's last line, docstring included


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PIPELINE.rglob("*.py"))}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_function_in_pipeline_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in MODULES.values()
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: split them into named helpers: {long}"


def _imports(name: str, path: Path) -> set[str]:
    """The pipeline modules that importing `name` runs, by every import statement in it (at any depth). Importing
    pipeline.a.b runs pipeline/a/__init__.py first, unless `name` is inside pipeline.a already."""
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # not `pipeline` itself: its __init__ imports errors alone
                module = ".".join(parts[:i])
                if module in MODULES and module != name and not name.startswith(module + "."):
                    found.add(module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (module -> the modules it imports) as [a, b, ..., a]; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_no_import_cycle_in_pipeline():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert not cycle, f"import cycle: {' -> '.join(cycle)} (an import only ever points down: docs/architecture.md)"


def _pipeline_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from pipeline... import name` in the file, at any depth."""
    return [
        (node.module, alias.name)
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
        for alias in node.names
    ]


@pytest.mark.parametrize("path", [*MODULES.values(), ROOT / "cli.py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_only_public_names_that_exist_are_imported_from_pipeline(path):
    """The imports inside functions too (cli.py's and the stages' lazy imports run only with their command)."""
    for module, attr in _pipeline_imports(path):
        assert not attr.startswith("_"), f"{path.name} imports the private {module}.{attr}"
        exists = hasattr(importlib.import_module(module), attr) or importlib.util.find_spec(f"{module}.{attr}")
        assert exists, f"{path.name}: {module} has no {attr}"  # (find_spec: a submodule not imported yet)


OUTPUT_CALL = re.compile(r"(?<![\w.])print\(|\bconsole\.")


def test_the_library_prints_only_through_the_console_module():
    """Output in pipeline/ is the CLI's renderers and the progress bar (pipeline/console.py); every other module
    reports through `logging` (docs/architecture.md, "Output"). `grep -rn "print(\\|console\\." pipeline/`."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in MODULES.values()
        if path.name != "console.py" or path.parent != PIPELINE
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTPUT_CALL.search(line)
    ]
    assert not found, f"output outside pipeline/console.py: log it (log.info, log.warning) instead: {found}"
