"""The benchmarks use the library's public API only: every `benchmarks/bench_*.py` imports (a renamed or private
name it relies on fails here, not in a benchmark run nobody looks at), and the cheapest section runs."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")  # run, common...


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


@pytest.mark.parametrize("name", MODULES)
def test_benchmarks_import_only_public_names_that_exist(name):
    """The imports inside the sections' functions too: those run only when the section does."""
    for module, attr in _pipeline_imports(ROOT / "benchmarks" / f"{name}.py"):
        assert hasattr(importlib.import_module(module), attr), f"{name}: {module} has no {attr}"
        assert not attr.startswith("_") or (module, attr) in KNOWN_PRIVATE, f"{name}: private {module}.{attr}"


@pytest.mark.slow
def test_the_store_section_runs_quick(tmp_path, capsys):
    from benchmarks import run

    out = tmp_path / "results.json"
    assert run.main(["--quick", "--only", "store", "--out", str(out)]) == 0
    (entry,) = json.loads(out.read_text(encoding="utf-8"))["runs"].values()
    assert entry["quick"] and "error" not in entry["sections"]["store"]


def test_quick_runs_on_made_up_captions_without_the_real_file(tmp_path, monkeypatch, capsys):
    """A clean clone has no ../shared/data: `--quick` falls back to made-up captions and says so; a full run
    still stops with one error line."""
    from benchmarks import common, run

    monkeypatch.setattr(common, "KARPATHY_FILE", tmp_path / "absent.json.gz")
    monkeypatch.setattr(common, "_QUICK", False)
    out = tmp_path / "results.json"
    assert run.main(["--only", "step", "--out", str(out)]) == 1
    assert "error: the real Flickr30k captions are needed" in capsys.readouterr().err
    assert run.main(["--quick", "--only", "step", "--out", str(out)]) == 0
    assert "made-up captions" in capsys.readouterr().err
    (entry,) = json.loads(out.read_text(encoding="utf-8"))["runs"].values()
    assert entry["synthetic_captions"] and "tables" in entry["sections"]["step"]


def test_every_section_is_registered():
    """One entry point: every bench_*.py is a section of benchmarks.run (bench_ddp is also its torchrun worker)."""
    from benchmarks import run

    registered = {fn.__module__.rsplit(".", 1)[1] for fn in run.SECTIONS.values()}
    assert set(BENCHMARKS) == registered


def test_the_word2vec_controls_patch_what_fit_calls():
    """bench_embeddings' control and ablation change pipeline.embeddings' functions for the time of one run:
    fit imports them from there when it runs (it once patched pipeline.train.initial_vectors, which does not
    exist: the word2vec-shuffled control failed with AttributeError)."""
    import pipeline.embeddings as embeddings
    from benchmarks.bench_embeddings import _transformed

    original = embeddings.initial_vectors, embeddings.centred
    with _transformed("word2vec-shuffled", 0):
        assert embeddings.initial_vectors is not original[0]
    with _transformed("word2vec-raw", 0):
        assert embeddings.centred is not original[1]
    assert (embeddings.initial_vectors, embeddings.centred) == original
