"""What fit, evaluate, generate and demo guarantee when things go wrong (issue 8), attacked as a user would:
through the command line, with files in the way, two runs at once, Ctrl-C and kill -9 at random moments, a full
disk (RLIMIT_FSIZE), hostile checkpoints, a broken Java, FIFOs. Every failure must be one `error:` line (exit 1)
or an interruption (exit 130), never a traceback, and must leave no temp file and no user's file changed.

Runs are tiny: the synthetic store of helpers_store.py and the "tiny" decoder preset.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers_store import ROOT, make_store

from pipeline import checkpoint, metrics
from pipeline.demo import MARKER, claim_folder
from pipeline.errors import UserError
from pipeline.train import TrainConfig, fit

FIT = ("--decoder", "tiny", "--device", "cpu", "--batch-size", "7", "--lr", "0.01", "--min-word-count", "1")


def _fit(store: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--store", str(store), "--out", str(out), *FIT, "--val-decode-images", "0", *extra]


def _error_line(result) -> str:
    """The one `error:` line on stderr, and no traceback anywhere."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp-*"))


def _assert_run_files_parse(out: Path) -> None:
    """Whatever moment a run was stopped at, each of its files opens."""
    for name in ("model.pt", "last.pt"):
        if (out / name).exists():
            checkpoint.load(out / name, resume=name == "last.pt")
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl: not strict JSON"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "features.h5", n_images=20).path


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    """OUT of a 1-epoch tiny fit (the settings of FIT, so that `_fit(..., "--resume")` continues it): model.pt,
    last.pt, metrics.jsonl, curves.png."""
    out = tmp_path_factory.mktemp("trained") / "out"
    fit(TrainConfig(store=str(store), out=str(out), epochs=1, batch_size=7, lr=0.01, device="cpu", min_word_count=1,
                    val_decode_images=0, decoder="tiny"))  # fmt: skip
    return out


@pytest.fixture
def photos(tmp_path, make_images) -> list[Path]:
    return make_images(tmp_path / "photos", ["a.jpg", "b.jpg"])


def _popen(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )  # fmt: skip


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.002)


def _lock_holder(out: Path) -> int | None:
    try:
        return int((out / ".lock").read_text())
    except (OSError, ValueError):
        return None


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


# -- fit: files of another run, the lock ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pt", "metrics.jsonl", "curves.png"])
def test_fit_refuses_an_out_holding_another_runs_file(store, tmp_path, cli, name):
    """model.pt without last.pt used to be overwritten with epoch 1, and metrics.jsonl deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's " + name.encode())
    result = cli(*_fit(store, out, "--epochs", "1"), code=1)
    assert "already holds" in _error_line(result) and name in _error_line(result)
    assert _snapshot(out) == {name: b"the user's " + name.encode()}


def test_fit_checks_out_before_any_work(store, tmp_path, cli):
    afile = tmp_path / "file"
    afile.write_text("mine")
    for out, says in ((afile, "is a file"), (afile / "sub", "cannot write")):
        result = cli(*_fit(store, out, "--epochs", "1"), code=1)
        assert says in _error_line(result)
        assert "epoch" not in result.stdout  # refused up front, not after an epoch
    assert afile.read_text() == "mine"


@pytest.mark.parametrize(
    "option, code",
    [(("--lr", "nan"), 1), (("--lr", "inf"), 1), (("--lr-gamma", "nan"), 1), (("--grad-clip", "nan"), 2)],
)
def test_fit_refuses_values_that_are_not_numbers(store, tmp_path, cli, option, code):
    """NaN passed every check and trained a NaN model. Options with a range are usage errors (exit 2)."""
    result = cli(*_fit(store, tmp_path / "out", "--epochs", "1", *option), code=code)
    if code == 1:
        assert option[0] in _error_line(result)
    assert option[0] in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_fit_in_the_stores_own_folder_leaves_the_store_alone(store, tmp_path, cli):
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copy(store, folder / "features.h5")
    before = (folder / "features.h5").read_bytes()
    cli(*_fit(folder / "features.h5", folder, "--epochs", "1"))
    assert (folder / "features.h5").read_bytes() == before
    assert {"model.pt", "last.pt", "metrics.jsonl", "curves.png"} <= {p.name for p in folder.iterdir()}


def test_second_fit_on_one_out_is_refused_and_readers_go_on(store, trained, tmp_path, cli, subprocess_env):
    """Two fits on one OUT used to interleave their metrics. The second is refused, naming the first's pid;
    evaluate and generate, which only read, are not stopped by the lock."""
    out = tmp_path / "out"
    first = _popen(_fit(store, out, "--epochs", "500"), subprocess_env)
    try:
        _wait_for(lambda: _lock_holder(out) == first.pid, first, "the lock")
        result = cli(*_fit(store, out, "--epochs", "500"), code=1)
        assert f"in use by another process (pid {first.pid})" in _error_line(result)
        _wait_for(lambda: (out / "model.pt").exists(), first, "model.pt")
        cli("evaluate", "--model", out / "model.pt", "--store", store, "--device", "cpu", "--no-meteor")
    finally:
        first.kill()
        first.communicate(timeout=60)


# -- Ctrl-C, kill -9, a full disk ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_vocabulary_store(tmp_path_factory) -> Path:
    """A store whose captions bring ~10k distinct training words: last.pt of ~8 MB, long enough to write that
    it can be interrupted while it is written."""
    rng = random.Random(0)
    captions = [[" ".join(f"w{rng.randrange(10**9)}" for _ in range(150)) for _ in range(5)] for _ in range(20)]
    return make_store(tmp_path_factory.mktemp("bigvocab") / "features.h5", n_images=20, captions=captions).path


def _interrupt(proc: subprocess.Popen, repeat: bool) -> tuple[int, str]:
    """SIGINT (and, with `repeat`, again every few ms, as an impatient user does) until the process ends."""
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while repeat and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_while_saving_or_training(store, big_vocabulary_store, tmp_path, subprocess_env):
    """Ctrl-C during a checkpoint save used to print a traceback (torch turns the interrupt into a RuntimeError)
    and leave a hidden temp file the size of the checkpoint. Now: exit 130, one line saying how to go on, no
    temp file, every file whole."""
    out = tmp_path / "saving"
    proc = _popen(_fit(big_vocabulary_store, out, "--epochs", "50"), subprocess_env)
    _wait_for(lambda: bool(_temps(out)), proc, "a checkpoint being written")
    code, err = _interrupt(proc, repeat=True)
    assert code == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted")
    assert _temps(out) == []
    _assert_run_files_parse(out)

    out = tmp_path / "training"  # Ctrl-C in the middle of epoch 2: fit says how to resume, with the command
    proc = _popen(_fit(store, out, "--epochs", "5000"), subprocess_env)
    _wait_for(lambda: (out / "curves.png").exists(), proc, "the first epoch")
    code, err = _interrupt(proc, repeat=False)
    assert code == 130 and "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert "continue with: uv run cli.py fit --store" in message and message.endswith("--resume"), message
    assert _temps(out) == []
    _assert_run_files_parse(out)


@pytest.mark.parametrize("error", [KeyboardInterrupt, lambda: OSError(28, "No space left on device")])
def test_a_failed_checkpoint_write_is_itself_not_a_runtime_error(tmp_path, monkeypatch, error):
    """torch.save turns an exception raised while it writes into RuntimeError("unexpected pos"): the traceback
    that Ctrl-C during a save used to print. checkpoint.save raises Ctrl-C as KeyboardInterrupt and a write
    error as UserError, and leaves the old file and no temp file."""
    import pipeline.files

    class Failing:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise error()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(pipeline.files, "open", lambda *a, **k: Failing(open(*a, **k)), raising=False)  # noqa: SIM115
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous epoch")
    with pytest.raises(KeyboardInterrupt if error is KeyboardInterrupt else UserError):
        checkpoint.save({"w": torch.zeros(10_000)}, target)
    assert target.read_bytes() == b"the previous epoch" and _temps(tmp_path) == []


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk

    return preexec


def test_full_disk_while_saving_is_one_error_line(store, tmp_path, subprocess_env):
    """A tiny model.pt is ~1.2 MB, last.pt ~3.6 MB: a 2 MB limit lets neither be written whole."""
    out = tmp_path / "out"
    proc = _popen(_fit(store, out, "--epochs", "2"), subprocess_env, preexec_fn=_limit_file_size(2 << 20))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}"), err
    assert "File too large" in lines[0]
    assert _temps(out) == [] and not (out / "last.pt").exists()


def test_stale_temp_files_of_a_killed_run_are_removed(store, trained, tmp_path, cli):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [out / f".{name}.tmp-{int(dead.stdout)}" for name in ("last.pt", "model.pt", "metrics.jsonl")]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    cli(*_fit(store, out, "--epochs", "2", "--resume"))
    assert _temps(out) == []


# -- a store without validation images --------------------------------------------------------------------------


def test_store_without_validation_images_still_gives_a_model(tmp_path, cli):
    """fit used to end with `val loss nan` and no model.pt. model.pt is now chosen by training loss, and says so."""
    store = make_store(tmp_path / "s.h5", n_images=8, splits=["train"] * 6 + ["test"] * 2).path
    result = cli(*_fit(store, tmp_path / "out", "--epochs", "2"))
    assert "lowest training loss" in result.stdout
    assert checkpoint.load(tmp_path / "out" / "model.pt")["best"]["metric"] == "neg_train_loss"
    _assert_run_files_parse(tmp_path / "out")  # val_loss is null, not NaN


# -- hostile checkpoints -----------------------------------------------------------------------------------------


def _hostile(kind: str, trained: Path, path: Path) -> None:
    good = torch.load(trained / "last.pt", weights_only=True)
    if kind == "model.pt as last.pt":
        shutil.copy(trained / "model.pt", path)
    elif kind == "no rng":
        torch.save({k: v for k, v in good.items() if k != "rng"}, path)
    elif kind == "no store provenance":
        torch.save(good | {"store": {}}, path)
    elif kind == "weights of another model":
        torch.save(good | {"model": {"w": torch.zeros(3)}}, path)
    elif kind == "a pickle":
        path.write_bytes(pickle.dumps({"format": 1, "code": Path("x")}))
    elif kind == "a zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data.txt", "hello")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "another project's .pt":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)


HOSTILE = ["model.pt as last.pt", "no rng", "no store provenance", "weights of another model", "a pickle", "a zip",
           "empty", "another project's .pt"]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_resume_from_a_hostile_last_pt_is_an_error_line(store, trained, tmp_path, cli, kind):
    out = tmp_path / "out"
    out.mkdir()
    _hostile(kind, trained, out / "last.pt")
    result = cli(*_fit(store, out, "--epochs", "2", "--resume"), code=1)
    assert "last.pt" in _error_line(result)


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


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_huge_beam_size_is_a_usage_error(trained, photos, cli, command):
    args = _generate(trained, "--image", photos[0]) if command == "generate" else ["evaluate"]
    cli(*args, "--beam-size", "100000", code=2)


def test_library_refuses_what_the_cli_would(store, tmp_path):
    """Scripts and the web page call the library directly, without the CLI's option ranges."""
    with pytest.raises(UserError, match="--lr"):
        fit(TrainConfig(store=str(store), out=str(tmp_path / "o"), lr=float("nan"), device="cpu"))
    from pipeline.evaluate import EvaluateConfig, evaluate

    with pytest.raises(UserError, match="--beam-size"):
        evaluate(EvaluateConfig(beam_size=10**6))
    assert not (tmp_path / "o").exists()
