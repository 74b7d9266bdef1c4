"""What fit guarantees when things go wrong (issue 8), attacked as a user would: through the command line, with
files in the way, two runs at once, Ctrl-C and kill -9 at random moments, a full disk (RLIMIT_FSIZE), hostile
last.pt files. Every failure must be one `error:` line (exit 1) or an interruption (exit 130), never a traceback,
and must leave no temp file and no user's file changed. Shared helpers and fixtures: tests/helpers_safety.py.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_safety import (
    _assert_run_files_parse,
    _error_line,
    _fit,
    _hostile,
    _limit_file_size,
    _lock_holder,
    _popen,
    _snapshot,
    _temps,
    _wait_for,
)
from helpers_store import make_store

from pipeline import checkpoint
from pipeline.errors import UserError
from pipeline.train import TrainConfig, fit

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


def test_fit_refuses_an_unknown_rate_schedule(store, tmp_path, cli):
    result = cli(*_fit(store, tmp_path / "out", "--epochs", "1", "--lr-schedule", "linear"), code=2)
    assert "--lr-schedule" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--lr-schedule"):
        fit(TrainConfig(store=str(store), out=str(tmp_path / "o"), lr_schedule="linear", device="cpu"))


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


def test_epoch_files_are_written_in_order_off_the_training_thread_and_errors_come_back(tmp_path):
    """The epoch writer: writes run one at a time in order; a failed write is raised by the next submit (and by
    close), as the training thread's own error."""
    import threading

    from pipeline.train.run_folder import EpochWriter

    writer, seen = EpochWriter(), []
    for i in range(3):
        writer.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    writer.close()
    assert [i for i, _ in seen] == [0, 1, 2] and all(name.startswith("epoch-files") for _, name in seen)

    writer = EpochWriter()
    writer.submit(lambda: (_ for _ in ()).throw(UserError("cannot write last.pt: No space left on device")))
    with pytest.raises(UserError, match="No space left"):
        writer.submit(lambda: None)
    writer.close()


def test_ctrl_c_while_fit_waits_for_an_epochs_files_lets_them_finish(tmp_path):
    """Ctrl-C (here raised in the main thread while it waits) does not cut a write short: the file is whole,
    then KeyboardInterrupt goes on as fit's own."""
    import threading

    from pipeline.files import write_text_atomic
    from pipeline.train.run_folder import EpochWriter

    target = tmp_path / "metrics.jsonl"

    def slow_write() -> None:
        time.sleep(0.5)
        write_text_atomic(target, "whole\n")

    writer = EpochWriter()
    writer.submit(slow_write)
    threading.Timer(0.1, lambda: signal.raise_signal(signal.SIGINT)).start()
    threading.Timer(0.2, lambda: signal.raise_signal(signal.SIGINT)).start()  # a second Ctrl-C waits too
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    assert target.read_text() == "whole\n" and _temps(tmp_path) == []


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


HOSTILE = ["model.pt as last.pt", "no rng", "no store provenance", "weights of another model", "a pickle", "a zip",
           "empty", "another project's .pt"]  # fmt: skip


@pytest.mark.parametrize("kind", HOSTILE)
def test_resume_from_a_hostile_last_pt_is_an_error_line(store, trained, tmp_path, cli, kind):
    out = tmp_path / "out"
    out.mkdir()
    _hostile(kind, trained, out / "last.pt")
    result = cli(*_fit(store, out, "--epochs", "2", "--resume"), code=1)
    assert "last.pt" in _error_line(result)


def test_library_refuses_what_the_cli_would(store, tmp_path):
    """Scripts and the web page call the library directly, without the CLI's option ranges."""
    with pytest.raises(UserError, match="--lr"):
        fit(TrainConfig(store=str(store), out=str(tmp_path / "o"), lr=float("nan"), device="cpu"))
    from pipeline.evaluate import EvaluateConfig, evaluate

    with pytest.raises(UserError, match="--beam-size"):
        evaluate(EvaluateConfig(beam_size=10**6))
    assert not (tmp_path / "o").exists()
