"""The benchmarks use the library's public API only: every `benchmarks/bench_*.py` imports (a renamed or private
name it relies on fails here, not in a benchmark run nobody looks at), and the cheapest section runs."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest
from conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


def _pipeline_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from pipeline... import name` in the file, at any depth (sections import lazily)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
        for alias in node.names
    ]


# private names the benchmarks still import, each with why it is left (empty this list to close the issue)
KNOWN_PRIVATE: set[tuple[str, str]] = set()  # private names a benchmark may import: none


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_import_only_public_names_that_exist(name):
    """The imports inside the sections' functions too: those run only when the section does."""
    for module, attr in _pipeline_imports(ROOT / "benchmarks" / f"{name}.py"):
        assert hasattr(importlib.import_module(module), attr), f"{name}: {module} has no {attr}"
        assert not attr.startswith("_") or (module, attr) in KNOWN_PRIVATE, f"{name}: private {module}.{attr}"


@pytest.mark.slow
def test_the_store_section_runs_quick(tmp_path, capsys):
    shared_data("flickr30k-captions")  # benchmarks.run needs the real captions
    from benchmarks import run

    out = tmp_path / "results.json"
    assert run.main(["--quick", "--only", "store", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text(encoding="utf-8"))["runs"].values()
    assert entry["quick"] and "error" not in entry["sections"]["store"]
