"""What demo guarantees when things go wrong (issue 8): it clears only folders it made, and only its own files,
and a second demo on one folder is refused. Every failure must be one `error:` line (exit 1), never a traceback,
and must leave no user's file changed. Shared helpers: tests/helpers_safety.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers_safety import (
    _error_line,
    _snapshot,
)
from helpers_store import ROOT

from pipeline.demo import MARKER, claim_folder
from pipeline.errors import UserError

# -- demo ------------------------------------------------------------------------------------------------------


def test_demo_refuses_folders_it_did_not_make(tmp_path, cli, monkeypatch):
    """`demo --out DIR` used to `rmtree` DIR whatever it held: `--out .` deleted the checkout."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "features.h5").write_text("my store")
    before = _snapshot(mine)
    for out in (mine, "."):
        monkeypatch.chdir(mine)
        result = cli("demo", "--out", out, "--images", "20", "--epochs", "1", code=1)
        assert "not made by the demo" in _error_line(result)
        assert _snapshot(mine) == before
    result = cli("demo", "--out", mine / "thesis.tex", "--images", "20", code=1)
    assert "is a file" in _error_line(result)
    assert _snapshot(mine) == before


def test_demo_folder_is_cleared_of_its_own_files_only(tmp_path, make_images):
    out = tmp_path / "demo"
    with claim_folder(out, ["images/shape_00000.jpg"]):  # a new folder: made, marked, and what it draws recorded
        pass
    assert (out / MARKER).is_file()
    make_images(out / "images", ["shape_00000.jpg", "holiday.jpg"])
    for name in ("features.h5", "model.pt", "last.pt", "metrics.jsonl", "curves.png", "scores.json"):
        (out / name).write_text("an earlier demo's")
    (out / "notes.txt").write_text("mine")
    with claim_folder(out):
        assert sorted(p.name for p in out.iterdir()) == [".captioner-demo", ".lock", "images", "notes.txt"]
        assert [p.name for p in (out / "images").iterdir()] == ["holiday.jpg"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".lock").exists()


def test_a_demo_rerun_deletes_only_the_images_it_recorded(tmp_path, make_images, monkeypatch):
    """A rerun deleted every file named like the demo's images: a user's images/shape_99999.jpg in a 20-image
    demo folder. Now it deletes what the earlier demo recorded drawing, and refuses to draw over a user's file."""
    import pipeline.demo
    import pipeline.demo.run
    from pipeline.config import DemoConfig

    def draw_only(cfg: DemoConfig) -> dict:  # the demo's stages after the drawing are not what is tested here
        pipeline.demo.make_dataset(cfg.out, cfg.images, size=32)
        return {}

    monkeypatch.setattr(pipeline.demo.run, "_run", draw_only)
    out = tmp_path / "demo"
    pipeline.demo.demo(DemoConfig(out=out, images=20))
    (mine,) = make_images(out / "images", ["shape_99999.jpg"])
    before = mine.read_bytes()
    (out / "images" / "shape_00019.jpg").unlink()  # drawn again by the rerun all the same
    pipeline.demo.demo(DemoConfig(out=out, images=20))
    assert mine.read_bytes() == before
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"shape_{i:05d}.jpg" for i in (*range(20), 99999)]
    (theirs,) = make_images(out / "images", ["shape_00020.jpg"])  # a 21-image demo would draw over it
    with pytest.raises(UserError, match="images/shape_00020.jpg"):
        pipeline.demo.demo(DemoConfig(out=out, images=21))
    assert theirs.is_file() and mine.is_file()


def test_a_second_demo_on_one_folder_is_refused(tmp_path, cli):
    """Two demos in one folder would delete each other's files: the second stops at once (the first here is a
    process holding the folder's lock, as a running demo does)."""
    out = tmp_path / "demo"
    out.mkdir()
    code = (
        "import sys, time\nfrom pipeline.files import exclusive\n"
        f"with exclusive({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("demo", "--out", out, "--images", "20", "--epochs", "1", code=1)
        assert f"in use by another process (pid {holder.pid})" in _error_line(result)
    finally:
        holder.kill()
        holder.communicate(timeout=30)
