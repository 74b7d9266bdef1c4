"""The benchmark scripts that take a folder from the user (`bench_embeddings --workdir`) delete and remake their
own runs there: a folder holding the user's files is refused, and nothing in it is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_embeddings


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_workdir_holding_the_users_files_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "experiments"
    (mine / "demo-random-0").mkdir(parents=True)  # named like a run folder the script would delete
    (mine / "demo-random-0" / "notes.txt").write_text("three weeks of notes")
    (mine / "flickr-2000-400.h5").write_text("my own file")
    before = _snapshot(mine)
    assert bench_embeddings.main(["--only", "demo", "--quick", "--workdir", str(mine)]) == 1
    assert "was not made by this script" in capsys.readouterr().err
    assert _snapshot(mine) == before
    a_file = mine / "flickr-2000-400.h5"
    assert bench_embeddings.main(["--only", "demo", "--workdir", str(a_file)]) == 1
    assert "is a file" in capsys.readouterr().err and _snapshot(mine) == before


@pytest.mark.parametrize("state", ["new", "empty", "marked"])
def test_workdir_new_empty_or_its_own_is_claimed(tmp_path, state):
    path = tmp_path / "work"
    if state != "new":
        path.mkdir()
    if state == "marked":
        bench_embeddings.claim_workdir(path)
        (path / "demo-random-0").mkdir()  # a run of an earlier invocation
    bench_embeddings.claim_workdir(path)
    assert (path / bench_embeddings.WORKDIR_MARK).is_file()
