"""What evaluate and generate guarantee when things go wrong (issue 8), attacked as a user would: hostile
checkpoints, files that are not checkpoints, a broken Java, FIFOs, figures in the way. Every failure must be one
`error:` line (exit 1) or an interruption (exit 130), never a traceback, and must leave no temp file and no
user's file changed. Shared helpers and fixtures: tests/helpers_safety.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers_safety import (
    _error_line,
    _hostile,
    _limit_file_size,
    _popen,
    _temps,
)

from pipeline import metrics

# -- hostile checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["no store provenance", "weights of another model", "a zip", "empty", "the store"])
def test_evaluate_and_generate_refuse_a_hostile_model(store, trained, tmp_path, photos, cli, kind):
    model = tmp_path / "model.pt"
    if kind == "the store":
        model = store
    else:
        _hostile(kind, trained, model)
    _error_line(cli("evaluate", "--model", model, "--store", store, "--device", "cpu", "--no-meteor", code=1))
    _error_line(cli("generate", "--image", photos[0], "--model", model, "--device", "cpu", code=1))


def _foreign_files(tmp_path: Path, store: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may give where a checkpoint or weights file is expected, and what the error line calls them."""
    text = tmp_path / "notes.txt"
    text.write_text("hello, a text file\n")
    module = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), module)  # a pickled module, not a state_dict: loading it would run code
    pickled = tmp_path / "data.pkl"
    pickled.write_bytes(pickle.dumps({"format": 1, "code": Path("x")}))
    return {"HDF5": (store, "an HDF5 file"), "text": (text, "a text file"), "module": (module, "Python objects"),
            "pickle": (pickled, "Python objects")}  # fmt: skip


@pytest.mark.parametrize("kind", ["HDF5", "text", "module", "pickle"])
def test_a_file_that_is_not_a_checkpoint_or_weights_says_what_it_is(store, trained, tmp_path, photos, flickr8k_dir,
                                                                    cli, kind):  # fmt: skip
    """An HDF5 file as --model (generate, serve) printed torch's advice to re-run with `weights_only=False`, which
    can run arbitrary code; a text file as --model or --weights printed `KeyError: 101`."""
    path, called = _foreign_files(tmp_path, store)[kind]
    runs = {
        "generate": (("generate", "--image", photos[0], "--model", path, "--device", "cpu"), "a checkpoint"),
        "serve": (("serve", "--model", path, "--port", "0", "--device", "cpu"), "a checkpoint"),
        "extract": (("extract", "--images", flickr8k_dir, "--store", tmp_path / "s.h5", "--weights", path),
                    "a ResNet50 state_dict"),
    }  # fmt: skip
    for args, expected in runs.values():
        line = _error_line(cli(*args, code=1))
        assert str(path) in line and called in line and expected in line, line
        for advice in ("weights_only", "arbitrary code", "KeyError", "UnpicklingError", "Re-running"):
            assert advice not in line, line


# -- evaluate ----------------------------------------------------------------------------------------------------


def _evaluate(trained: Path, store: Path, *extra) -> list:
    return ["evaluate", "--model", trained / "model.pt", "--store", store, "--device", "cpu", "--no-meteor", *extra]


def test_evaluate_out_replaces_only_its_own_json(store, trained, tmp_path, cli):
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    for target in (mine, trained / "model.pt", store):
        before = target.read_bytes()
        result = cli(*_evaluate(trained, store, "--out", target), code=1)
        assert "not a file that evaluate wrote" in _error_line(result)
        assert target.read_bytes() == before
    out = tmp_path / "scores.json"
    cli(*_evaluate(trained, store, "--out", out))
    cli(*_evaluate(trained, store, "--out", out, "--beam-size", "1"))  # its own file: replaced
    assert json.loads(out.read_text())["details"]["beam_size"] == 1


def test_evaluate_checks_out_before_decoding(store, trained, tmp_path, cli, monkeypatch):
    import pipeline.evaluate

    def decode(*args, **kwargs):
        raise AssertionError("decoded before --out was checked")

    monkeypatch.setattr(pipeline.evaluate, "decode_rows", decode)
    afile = tmp_path / "file"
    afile.write_text("mine")
    assert "--out" in _error_line(cli(*_evaluate(trained, store, "--out", afile / "scores.json"), code=1))


@pytest.fixture
def fake_java(tmp_path, monkeypatch):
    """A `java` that answers -version and fails at everything else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text('#!/bin/sh\nif [ "$1" = "-version" ]; then echo \'openjdk version "17"\' >&2; exit 0; fi\n'
                    'echo "Error: could not create the Java Virtual Machine" >&2; exit 1\n')  # fmt: skip
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    metrics.java_problem.cache_clear()
    yield java
    metrics.java_problem.cache_clear()


def test_a_java_that_cannot_run_meteor(store, trained, tmp_path, cli, fake_java):
    result = cli(*_evaluate(trained, store)[:-1], "--out", tmp_path / "s.json")  # METEOR when Java works
    assert "cannot run the PTB tokenizer" in result.stdout + result.stderr
    assert "METEOR" not in json.loads((tmp_path / "s.json").read_text())["metrics"]
    result = cli(*_evaluate(trained, store)[:-1], "--meteor", code=1)
    assert "Java" in _error_line(result)


def test_no_meteor_does_not_talk_about_java(store, trained, cli, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    metrics.java_problem.cache_clear()
    try:
        result = cli(*_evaluate(trained, store))
    finally:
        metrics.java_problem.cache_clear()
    assert "java" not in (result.stdout + result.stderr).lower()


# -- generate ----------------------------------------------------------------------------------------------------


def _generate(trained: Path, *extra) -> list:
    return ["generate", "--model", trained / "model.pt", "--device", "cpu", "--beam-size", "1", *extra]


def test_generate_attention_replaces_only_its_own_figures(trained, photos, tmp_path, cli, make_images):
    """Refused up front, before the models load: a file that is not generate's figure (a user's PNG, a text
    file), a name that is not .png (matplotlib used to fail after the caption with a traceback)."""
    notes = tmp_path / "notes.png"
    notes.write_text("not even a picture")
    (drawing,) = make_images(tmp_path, ["drawing.png"])
    for target in (notes, drawing):
        before = target.read_bytes()
        result = cli(*_generate(trained, "--image", photos[0], "--attention", target), code=1)
        assert "not an attention figure that generate wrote" in _error_line(result)
        assert target.read_bytes() == before
    for name in ("att.jpg", "att"):
        result = cli(*_generate(trained, "--image", photos[0], "--attention", tmp_path / name), code=1)
        assert ".png" in _error_line(result)


def test_generate_never_takes_fits_curves_for_its_own_figure(trained, photos, tmp_path, cli, make_images):
    """fit's curves.png and generate's figures used to carry one PNG mark, so `--attention RUN/curves.png`, or
    `--attention RUN` with an image named curves.jpg, replaced the curves with exit 0."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "curves.png", run / "curves.png")
    before = (run / "curves.png").read_bytes()
    (curves_photo,) = make_images(tmp_path / "mine", ["curves.jpg"])
    for image, target in ((photos[0], run / "curves.png"), (curves_photo, run)):
        result = cli(*_generate(trained, "--image", image, "--attention", target), code=1)
        assert "curves.png exists and is not an attention figure that generate wrote" in _error_line(result)
        assert (run / "curves.png").read_bytes() == before


def test_generate_attention_into_a_folder_and_again(trained, photos, tmp_path, cli):
    """`--attention DIR/` (a path ending in /) or `--attention DIR` (an existing folder): one figure per image
    inside it. A rerun replaces generate's own figures."""
    for target in (f"{tmp_path / 'figs'}{os.sep}", tmp_path / "figs"):
        cli(*_generate(trained, "--image", photos[0].parent, "--attention", target))
        assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["a.png", "b.png"]


def test_generate_says_which_figure_is_whose_and_never_writes_one_twice(trained, tmp_path, cli, make_images):
    """`--attention DIR` with a.jpg, a.png and a_1.jpg wrote a.png, a_1.png and a_1_2.png without saying which
    was whose; and with a.jpg, a_2.jpg, a.png (in that order) a_2.jpg's and a.png's figures were one file."""
    photos = make_images(tmp_path / "photos", ["a.jpg", "a_2.jpg", "a.png", "a_1.jpg"])
    figs = tmp_path / "figs"
    args = [a for p in photos for a in ("--image", p)]
    for extra in ((), ("--json",)):
        result = cli(*_generate(trained, *args, "--attention", f"{figs}{os.sep}", *extra))
        lines = result.stdout.splitlines()
        if extra:
            shown = [(json.loads(line)["image"], json.loads(line)["attention"]) for line in lines]
        else:
            shown = [(line.split(": ", 1)[0], line.rsplit("(attention figure: ", 1)[1].rstrip(")")) for line in lines]
        assert [image for image, _ in shown] == [str(p) for p in photos]
        assert len({figure for _, figure in shown}) == 4 and all(Path(f).parent == figs for _, f in shown)
        assert sorted(p.name for p in figs.iterdir()) == sorted(Path(f).name for _, f in shown)


def test_generate_attention_that_cannot_be_written(trained, photos, tmp_path, cli, subprocess_env):
    """Up front when its folder cannot be made; on a full disk, the caption is printed, then the error."""
    afile = tmp_path / "file"
    afile.write_text("mine")
    result = cli(*_generate(trained, "--image", photos[0], "--attention", afile / "att.png"), code=1)
    assert "--attention" in _error_line(result)
    # no bytecode written under the limit: run before any other subprocess had filled the session's bytecode
    # cache, the command wrote .pyc files under it and ended in "Aborted." before captioning
    env = {**subprocess_env, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _popen([str(a) for a in _generate(trained, "--image", photos[0], "--attention", tmp_path / "att.png")],
                  env, preexec_fn=_limit_file_size(20_000))  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert out.startswith(f"{photos[0]}:"), err  # the caption (this 1-epoch model's may be empty)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: cannot write"), err
    assert _temps(tmp_path) == [] and not (tmp_path / "att.png").exists()


def test_generate_never_blocks_on_a_fifo_or_dev_zero(trained, photos, tmp_path, cli, subprocess_env):
    """Among several images a FIFO used to block generate forever (in a subprocess here, for that reason)."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        assert "not an image file" in _error_line(cli(*_generate(trained, "--image", path), code=1))
    proc = _popen([str(a) for a in _generate(trained, "--image", fifo, "--image", photos[0])], subprocess_env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "pipe.jpg" in err and out.startswith(f"{photos[0]}:"), err


def test_generate_ends_without_the_teardown_and_loses_nothing(trained, photos, tmp_path, subprocess_env):
    """generate ends with os._exit once it has flushed its output and run the atexit functions (cli.py,
    `_end_without_teardown`: it skips the interpreter's teardown of torch's modules). Into a pipe, every JSON
    line arrives whole, every figure is a whole PNG, an atexit function registered at start-up (as logging's
    and temporary files' are) still runs, and the status is 0."""
    from PIL import Image

    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "atexit-ran"
    (site / "sitecustomize.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
    )
    env = {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(site), subprocess_env.get("PYTHONPATH", "")])}
    figs = tmp_path / "figs"
    args = _generate(trained, *[a for p in photos for a in ("--image", p)], "--json", "--attention", f"{figs}/")
    proc = _popen([str(a) for a in args], env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    items = [json.loads(line) for line in out.splitlines()]
    assert [item["image"] for item in items] == [str(p) for p in photos] and len(photos) >= 2
    assert len(list(figs.iterdir())) == len(photos)
    for figure in figs.iterdir():
        with Image.open(figure) as im:
            im.load()  # a truncated PNG fails here
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_huge_beam_size_is_a_usage_error(trained, photos, cli, command):
    args = _generate(trained, "--image", photos[0]) if command == "generate" else ["evaluate"]
    cli(*args, "--beam-size", "100000", code=2)
