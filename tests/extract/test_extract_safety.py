"""`cli.py extract` when things go wrong: nothing the user made is lost, every failure is one `error:` line.

Most tests run the CLI in-process with a TinyTrunk standing in for the ResNet50 (the store's mechanics do
not depend on the features' values). Tests that kill, interrupt or limit a whole process fork it from a
warm zygote process (`helpers_extract.Zygote`), which costs milliseconds instead of seconds a process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import io
import json
import math
import os
import random
import signal
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers_extract import Zygote, fake_extract, wait_gone
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import store as feature_store
from pipeline.errors import UserError
from pipeline.store import PENDING, SKIPPED, UNREADABLE, WRITTEN, FeatureStore

ROOT = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_line(stderr: str) -> str:
    """The one `error:` line a failed run ends with (warnings may come before it); no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert all(line.startswith("warning: ") for line in lines[:-1]), stderr
    return lines[-1]


def args_for(images: Path, store: Path, *extra: str | Path) -> list[str | Path]:
    return ["extract", "--images", images, "--store", store, "--device", "cpu", "--weights", "none",
            "--workers", "0", "--batch-size", "2", *extra]  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    """Hidden files (temp stores, locks) and `.partial` files left in the store's folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial"))


def same_store(a: Path, b: Path, exact: bool = True) -> None:
    """Two stores hold the same images, captions, splits, statuses and (written) features."""
    x, y = FeatureStore(a), FeatureStore(b)
    try:
        assert x.images == y.images
        assert x.caption_text == y.caption_text
        np.testing.assert_array_equal(x.caption_image, y.caption_image)
        np.testing.assert_array_equal(x.split, y.split)
        np.testing.assert_array_equal(x.status, y.status)
        assert x.complete == y.complete
        rows = x.status == WRITTEN
        fx, fy = np.asarray(x.features)[rows], np.asarray(y.features)[rows]
        if exact:
            np.testing.assert_array_equal(fx, fy)
        else:  # computed in another process: the same within float16 rounding
            np.testing.assert_allclose(fx.astype(np.float32), fy.astype(np.float32), rtol=2e-3, atol=1e-3)
    finally:
        x.close()
        y.close()


@pytest.fixture
def fast(monkeypatch):
    """`cli.py extract` runs extract with a TinyTrunk for its encoder, in this process."""
    monkeypatch.setattr("pipeline.extract.extract", fake_extract())


@contextlib.contextmanager
def interrupt_after(k: int):
    """Within the block, Ctrl-C arrives while batch k+1 is encoded (after k batches were written): the encoder
    that extract is given raises it."""
    import pipeline.extract

    calls = {"n": 0}

    class Interrupting(torch.nn.Module):
        def __init__(self, trunk: torch.nn.Module) -> None:
            super().__init__()
            self.trunk = trunk

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] > k:
                raise KeyboardInterrupt
            return self.trunk(x)

    original = pipeline.extract.extract
    pipeline.extract.extract = fake_extract(trunk=Interrupting)
    try:
        yield
    finally:
        pipeline.extract.extract = original


@pytest.fixture(scope="module")
def zygote(tmp_path_factory, subprocess_env):
    z = Zygote(tmp_path_factory.mktemp("zygote"), subprocess_env)
    yield z
    z.close()


# --- --store: the user's files -----------------------------------------------------------------------------------


def _user_files(folder: Path, make_images) -> dict[str, Path]:
    photo = make_images(folder, ["holiday.jpg"])[0]
    checkpoint = folder / "model.pt"
    torch.save({"weights": torch.ones(3)}, checkpoint)
    text = folder / "notes.h5"
    text.write_text("my notes, not a feature store\n")
    other_hdf5 = folder / "experiment.h5"
    with h5py.File(other_hdf5, "w") as f:
        f["data"] = np.arange(10)
    return {"photo": photo, "checkpoint": checkpoint, "text": text, "hdf5": other_hdf5}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_store_path_holding_a_users_file_is_refused_even_with_overwrite(
    tmp_path, make_flickr8k, make_images, cli, fast, overwrite
):
    images = make_flickr8k(tmp_path / "imgs", 2)
    extra = ["--overwrite"] if overwrite else []
    for kind, path in _user_files(tmp_path / "mine", make_images).items():
        before = sha256(path)
        result = cli(*args_for(images, path, *extra), code=1)
        line = error_line(result.stderr)
        assert str(path) in line and "extract replaces only a store it made" in line, kind
        assert sha256(path) == before, kind  # byte for byte
        assert leftovers(path.parent) == [], kind


def test_a_store_path_that_is_a_folder_or_under_a_file_is_refused(tmp_path, make_flickr8k, cli, fast, monkeypatch):
    images = make_flickr8k(tmp_path / "imgs", 2)
    folder = tmp_path / "out"
    (folder / "keep").mkdir(parents=True)
    assert "is a folder" in error_line(cli(*args_for(images, folder, "--overwrite"), code=1).stderr)
    assert [p.name for p in folder.iterdir()] == ["keep"]

    # An unwritable --store folder is found before any image is read (as root, chmod would not do: a
    # folder "under" a regular file cannot be created by anyone).
    monkeypatch.setattr("pipeline.extract.encode.load_uint8", lambda *a: pytest.fail("an image was read"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    line = error_line(cli(*args_for(images, afile / "sub" / "s.h5"), code=1).stderr)
    assert "cannot write in the --store folder" in line
    assert afile.read_text() == "mine"


def test_not_enough_disk_space_is_refused_before_any_work(tmp_path, make_flickr8k, cli, fast, monkeypatch):
    images = make_flickr8k(tmp_path / "imgs", 3)
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 4, 4096  # 16 KiB free

    monkeypatch.setattr(os, "statvfs", lambda p: Full() if str(p) == str(tmp_path) else real(p))
    monkeypatch.setattr("pipeline.extract.encode.load_uint8", lambda *a: pytest.fail("an image was read"))
    line = error_line(cli(*args_for(images, tmp_path / "s.h5"), code=1).stderr)
    assert "not enough disk space" in line and "0.6 MiB of features to write" in line
    assert not (tmp_path / "s.h5").exists() and leftovers(tmp_path) == []


# --- resuming around a changed image folder ------------------------------------------------------------------------


def test_interrupted_store_is_resumed_around_a_changed_image_folder(tmp_path, make_flickr8k, make_images, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 6)
    store = tmp_path / "s.h5"
    with interrupt_after(2):  # 4 of 6 images written
        result = cli(*args_for(images, store), code=130)
    assert "Traceback" not in result.stderr and leftovers(tmp_path) == []
    with FeatureStore(store) as s:
        assert list(s.status) == [WRITTEN] * 4 + [PENDING] * 2

    # The user deletes a written image and adds a new one.
    (images / "1001_img.jpg").unlink()
    make_images(images, ["1500_new.jpg"], start=99)
    with open(images / "Flickr8k.token.txt", "a") as f:
        f.write("1500_new.jpg#0\ta new picture .\n")
    result = cli(*args_for(images, store))
    assert "5 images kept, 1 removed, 1 added" in result.stdout
    assert "done: 6 images written" in result.stdout
    assert "3 this run" in result.stdout  # 2 pending + 1 new: the 3 finished rows that remain are kept

    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean)
    assert leftovers(tmp_path) == []


def test_complete_store_takes_new_images_and_drops_removed_ones(tmp_path, make_flickr8k, make_images, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 4)
    (images / "1003_img.jpg").write_bytes(b"not a picture")  # skipped for good: stays skipped
    store = tmp_path / "s.h5"
    cli(*args_for(images, store))
    (images / "1000_img.jpg").unlink()
    make_images(images, ["1700_new.jpg", "1701_new.jpg"], start=50)
    with open(images / "Flickr8k.token.txt", "a") as f:
        f.write("1700_new.jpg#0\tnew one .\n1701_new.jpg#0\tnew two .\n")
    result = cli(*args_for(images, store))
    assert "3 images kept, 1 removed, 2 added" in result.stdout
    assert "2 this run" in result.stdout
    with FeatureStore(store) as s:
        assert s.images == ["1001_img.jpg", "1002_img.jpg", "1003_img.jpg", "1700_new.jpg", "1701_new.jpg"]
        assert list(s.status) == [WRITTEN, WRITTEN, SKIPPED, WRITTEN, WRITTEN]
        assert s.complete

    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean)


def test_changed_captions_rebuild_the_store_and_keep_every_feature(tmp_path, make_flickr8k, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 3)
    store = tmp_path / "s.h5"
    cli(*args_for(images, store))
    token = images / "Flickr8k.token.txt"
    token.write_text(token.read_text().replace("caption 0 of picture 1001_img.jpg", "a corrected caption"))
    result = cli(*args_for(images, store))
    assert "captions or splits changed" in result.stdout and "0 this run" in result.stdout
    with FeatureStore(store) as s:
        assert "a corrected caption ." in s.caption_text
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean)

    # What the features depend on still refuses.
    line = error_line(cli(*args_for(images, store, "--dtype", "float32"), code=1).stderr)
    assert "dtype" in line and "--overwrite" in line


def test_ctrl_c_while_a_store_is_rebuilt_keeps_the_old_one(
    tmp_path, make_flickr8k, make_images, cli, fast, monkeypatch
):
    images = make_flickr8k(tmp_path / "imgs", 3)
    store = tmp_path / "s.h5"
    cli(*args_for(images, store))
    before = sha256(store)
    make_images(images, ["1900_new.jpg"])
    with open(images / "Flickr8k.token.txt", "a") as f:
        f.write("1900_new.jpg#0\tnew .\n")

    def interrupted(self, new):
        assert new.exists() and new.name.startswith(".s.h5.tmp-")
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_store.Carry, "copy_into", interrupted)
    cli(*args_for(images, store), code=130)
    assert sha256(store) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr("pipeline.extract.extract", fake_extract())
    assert "1 this run" in cli(*args_for(images, store)).stdout


def test_leftovers_of_a_killed_creation_are_removed_and_a_users_partial_file_is_not(tmp_path, make_flickr8k, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 2)
    store = tmp_path / "s.h5"
    for name in (".s.h5.tmp-1", f".s.h5.tmp-{os.getpid()}0", "s.h5.partial"):  # dead and live pids, old name
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["format_version"] = 1  # a store begun by extract
    (tmp_path / ".other.h5.tmp-1").write_text("another file's temp")
    cli(*args_for(images, store))
    assert leftovers(tmp_path) == [".other.h5.tmp-1"]

    for mine in ("text", "hdf5"):  # a user's own file that happens to have the old name survives
        store.unlink()
        partial = tmp_path / "s.h5.partial"
        if mine == "text":
            partial.write_text("a file of mine that happens to have this name")
        else:
            with h5py.File(partial, "w") as f:
                f["my_results"] = [1, 2, 3]
        cli(*args_for(images, store))
        assert partial.exists(), mine
        if mine == "text":
            assert partial.read_text().startswith("a file of mine")
        else:
            with h5py.File(partial, "r") as f:
                assert list(f["my_results"][:]) == [1, 2, 3]
        partial.unlink()


# --- read errors are retried, decode errors are not ----------------------------------------------------------------


def test_read_errors_are_retried_by_the_next_run(tmp_path, make_flickr8k, cli, fast, monkeypatch):
    import pipeline.extract.encode as extract_module

    images = make_flickr8k(tmp_path / "imgs", 5)
    (images / "1004_img.jpg").write_bytes(b"\xff\xd8 truncated")  # undecodable: skipped for good
    real = extract_module.load_uint8

    def flaky(path, config):
        if path.name == "1001_img.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if path.name == "1002_img.jpg":  # deleted (or a dangling symlink) after the captions were read
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path, config)

    monkeypatch.setattr(extract_module, "load_uint8", flaky)
    store = tmp_path / "s.h5"
    result = cli(*args_for(images, store))
    assert "3 skipped (1 undecodable, 2 unreadable: rerun to retry the unreadable ones)" in result.stdout
    warnings = result.stderr.splitlines()
    assert any("1001_img.jpg for now: cannot read it (PermissionError" in w for w in warnings), warnings
    assert any("1004_img.jpg: cannot decode it" in w for w in warnings), warnings
    with FeatureStore(store) as s:
        assert list(s.status) == [WRITTEN, UNREADABLE, UNREADABLE, WRITTEN, SKIPPED]
        assert s.complete  # fit can use the store as it is: the unreadable rows are ignored like skipped ones
        assert sorted(np.concatenate([s.split_rows(x) for x in ("train", "val", "test")])) == [0, 3]
        assert (int(s.attrs["images_unreadable"]), int(s.attrs["images_skipped"])) == (2, 1)

    monkeypatch.setattr(extract_module, "load_uint8", real)  # the disk is readable again
    result = cli(*args_for(images, store))
    assert "2 unreadable ones to retry" in result.stdout and "2 this run" in result.stdout
    assert "done: 4 images written, 1 skipped," in result.stdout
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean)


def test_read_errors_and_decode_errors_are_told_apart(tmp_path, make_images):
    from pipeline.transform import DECODE_ERRORS, is_read_error, open_image

    assert is_read_error(PermissionError(errno.EACCES, "Permission denied"))
    assert is_read_error(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert is_read_error(OSError(errno.EIO, "Input/output error"))
    assert is_read_error(IsADirectoryError(errno.EISDIR, "Is a directory"))
    good = make_images(tmp_path, ["good.jpg"])[0].read_bytes()
    bad = {"empty.jpg": b"", "text.jpg": b"hello", "truncated.jpg": good[: len(good) // 2]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DECODE_ERRORS) as e:
            open_image(tmp_path / name)
        assert not is_read_error(e.value), (name, e.value)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DECODE_ERRORS) as e:
        open_image(tmp_path / "dangling.jpg")
    assert is_read_error(e.value)


# --- a dead decoding worker, Ctrl-C, kill -9, a full disk ----------------------------------------------------------


def test_a_killed_decoding_worker_is_one_error_line_and_the_store_resumes(
    tmp_path, make_flickr8k, cli, fast, monkeypatch
):
    import pipeline.extract.encode as extract_module

    images = make_flickr8k(tmp_path / "imgs", 6)
    store = tmp_path / "s.h5"
    main, real = os.getpid(), extract_module.load_uint8

    def oom_killed(path, config):  # what the kernel's OOM killer does to a worker
        if path.name == "1004_img.jpg" and os.getpid() != main:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, config)

    monkeypatch.setattr(extract_module, "load_uint8", oom_killed)
    result = cli(*args_for(images, store, "--workers", "1"), code=1)
    line = error_line(result.stderr)
    assert "a decoding worker died" in line and "rerun the same command to resume" in line
    monkeypatch.setattr(extract_module, "load_uint8", real)
    cli(*args_for(images, store, "--workers", "1"))
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean)


@pytest.mark.parametrize("broken", [ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), EOFError()])
def test_a_worker_killed_while_sending_a_batch_is_the_same_error_line(tmp_path, make_flickr8k, cli, fast, monkeypatch,
                                                                       broken):  # fmt: skip
    """A worker killed while it sends its batch breaks the pipe (the test above, about one run in ten under
    load): that too is a dead worker, not `error: ConnectionResetError`."""
    import pipeline.extract.encode as extract_module

    images = make_flickr8k(tmp_path / "imgs", 6)
    store = tmp_path / "s.h5"
    real_loader = extract_module.loader

    def breaks_after_one_batch(*args, **kwargs):
        batches = iter(real_loader(*args, **kwargs))
        yield next(batches)
        raise broken

    monkeypatch.setattr(extract_module, "loader", breaks_after_one_batch)
    line = error_line(cli(*args_for(images, store), code=1).stderr)
    assert line.startswith("error: a decoding worker died (") and "rerun the same command to resume" in line
    with FeatureStore(store) as s:
        assert (s.status == WRITTEN).sum() == 2  # the batch that came through is kept
    monkeypatch.setattr(extract_module, "loader", real_loader)
    assert "4 this run" in cli(*args_for(images, store)).stdout


def test_ctrl_c_with_decoding_workers_exits_130_without_a_traceback(tmp_path, make_flickr8k, zygote):
    images = make_flickr8k(tmp_path / "imgs", 8)
    store = tmp_path / "s.h5"
    args = args_for(images, store, "--workers", "1", "--batch-size", "1")
    run = zygote.start(*args, fake=0.1)
    run.wait_for_output("extract: 2/8")
    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group, workers too
    assert run.wait() == 130, run.stderr
    assert run.stderr.strip() == "interrupted: rerun the same command to resume"
    assert leftovers(tmp_path) == []
    with FeatureStore(store) as s:
        assert set(s.status) <= {WRITTEN, PENDING} and (s.status == WRITTEN).sum() >= 2
    assert zygote.run(*args).code == 0


def test_kill_9_loses_at_most_a_second_of_work_and_the_rerun_redoes_only_the_rest(
    tmp_path, make_flickr8k, zygote, cli, fast
):
    """Statuses are synced at most a second after their features (store.Writer): a kill -9 half-way keeps the
    rows finished before the last second, the same command goes on from there, and ends with the store an
    uninterrupted run makes."""
    n, delay = 16, 0.25
    images = make_flickr8k(tmp_path / "imgs", n)
    store = tmp_path / "s.h5"
    args = args_for(images, store, "--batch-size", "1")
    run = zygote.start(*args, fake=delay)
    run.wait_for_output(f"extract: 8/{n}")  # two seconds in
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, run.stdout
    with FeatureStore(store) as s:
        assert set(s.status) <= {WRITTEN, PENDING} and not s.complete
        done = int((s.status == WRITTEN).sum())
    sync = inspect.signature(feature_store.Writer).parameters["sync_seconds"].default
    lost_at_most = math.ceil(sync / delay) + 1  # the rows since the last sync, and the one in flight
    assert 8 - lost_at_most <= done < n
    result = cli(*args)
    assert "resuming" in result.stdout and f"{n - done} this run" in result.stdout
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean, "--batch-size", "1"))
    same_store(store, clean, exact=False)
    assert leftovers(tmp_path) == []


def test_kill_9_takes_the_decoding_workers_down_with_it(tmp_path, make_flickr8k, zygote):
    images = make_flickr8k(tmp_path / "imgs", 8)
    store = tmp_path / "s.h5"
    args = args_for(images, store, "--workers", "1", "--batch-size", "1")
    # In the zygote's process group: were extract a group leader, its death would orphan the group, and the
    # kernel would hang up on the stopped worker below by itself.
    run = zygote.start(*args, fake=0.1, own_group=False)
    run.wait_for_output("extract: 2/8")
    (worker,) = run.workers()
    # Stopped, the worker cannot notice by itself that its parent is gone; and extract soon waits for it.
    os.kill(worker, signal.SIGSTOP)
    # While extract runs, a reader is told so in one line, and a second extract is refused.
    with pytest.raises(UserError, match=rf"is being written by extract \(pid {run.pid}\)"):
        FeatureStore(store)
    for extra in ([], ["--overwrite"]):  # --overwrite too: it used to orphan the first run's work
        second = zygote.run(*args, *extra)
        assert second.code == 1
        assert f"is in use by another process (pid {run.pid})" in error_line(second.stderr)

    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    try:
        assert wait_gone(worker), "the decoding worker outlived extract"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    with FeatureStore(store) as s:  # neither HDF5's lock nor extract's is left held
        assert set(s.status) <= {WRITTEN, PENDING}
    rerun = zygote.run(*args)
    assert rerun.code == 0, rerun.stderr
    assert "resuming" in rerun.stdout and leftovers(tmp_path) == []


def test_a_full_disk_is_one_error_line_and_the_store_resumes(tmp_path, make_flickr8k, zygote, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 8)
    store = tmp_path / "s.h5"
    args = args_for(images, store)
    # `ulimit -f` (SIGXFSZ ignored): writes past the limit fail with EFBIG, as they would with ENOSPC.
    # While the new store is created: the store would be ~1.6 MB.
    run = zygote.run(*args, fsize=100_000)
    assert run.code == 1, run.stderr  # it was 139: a segfault in HDF5's exit handler, after an h5py traceback
    assert error_line(run.stderr) == f"error: cannot write {store}: File too large"
    assert not store.exists() and leftovers(tmp_path) == []

    # Half-way through the rows: the rows before the limit are kept.
    cli(*args_for(images, store), code=0)
    with h5py.File(store, "r+") as f:  # the same store, all its rows pending again
        f["status"][:] = PENDING
        f.attrs["complete"] = False
    run = zygote.run(*args, fsize=store.stat().st_size // 2, full_exit=True)  # Python's whole exit, too
    assert run.code == 1, run.stderr
    assert error_line(run.stderr) == f"error: cannot write {store}: File too large"
    with FeatureStore(store) as s:
        written = int((s.status == WRITTEN).sum())
        assert 0 < written < 8
    result = cli(*args)
    assert f"{8 - written} this run" in result.stdout
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    same_store(store, clean, exact=False)


def test_sigkill_at_random_points_never_loses_the_store(tmp_path, make_flickr8k, zygote, cli, fast):
    """A bounded kill -9 loop: between kills the file always opens and its written rows are right; every
    rerun goes on from there, and the end is the uninterrupted run's store."""
    images = make_flickr8k(tmp_path / "imgs", 10)
    clean = tmp_path / "clean.h5"
    cli(*args_for(images, clean))
    with FeatureStore(clean) as c:
        reference = np.asarray(c.features, dtype=np.float32)
    store = tmp_path / "s.h5"
    args = args_for(images, store, "--batch-size", "1")
    rng = random.Random(0)
    for _ in range(5):
        run = zygote.start(*args, fake=0.02)
        delay = rng.uniform(0.0, 1.0)
        if not wait_gone(run.pid, timeout=delay):
            os.kill(run.pid, signal.SIGKILL)
        assert run.wait() in (0, -signal.SIGKILL), run.stderr
        if store.exists():
            with FeatureStore(store) as s:
                done = s.status == WRITTEN
                assert set(s.status) <= {WRITTEN, PENDING}
                np.testing.assert_allclose(np.asarray(s.features, dtype=np.float32)[done], reference[done], rtol=2e-3)
    final = zygote.run(*args)
    assert final.code == 0, final.stderr
    same_store(store, clean, exact=False)
    assert leftovers(tmp_path) == []


def test_a_store_that_a_reader_has_open_is_not_written(tmp_path, make_flickr8k, zygote, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 4)
    store = tmp_path / "s.h5"
    with interrupt_after(1):
        cli(*args_for(images, store), code=130)
    before = sha256(store)
    with FeatureStore(store) as reader:
        assert len(reader) == 4  # the file is open (as fit holds it while it trains)
        for extra in ([], ["--overwrite"]):
            run = zygote.run(*args_for(images, store, *extra))
            assert run.code == 1
            assert "is open in another process (a fit or evaluate reading it?)" in error_line(run.stderr)
    assert sha256(store) == before
    assert zygote.run(*args_for(images, store)).code == 0


def test_two_extracts_on_different_stores_in_one_folder_both_finish(tmp_path, make_flickr8k, zygote):
    images = make_flickr8k(tmp_path / "imgs", 4)
    a = zygote.start(*args_for(images, tmp_path / "a.h5", "--batch-size", "1"), fake=0.05)
    b = zygote.start(*args_for(images, tmp_path / "b.h5", "--batch-size", "1"), fake=0.05)
    assert (a.wait(), b.wait()) == (0, 0), (a.stderr, b.stderr)
    same_store(tmp_path / "a.h5", tmp_path / "b.h5")
    assert leftovers(tmp_path) == []


# --- damaged stores ------------------------------------------------------------------------------------------------


def test_a_truncated_store_is_a_clear_error_for_extract_and_readers(tmp_path, make_flickr8k, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 3)
    store = tmp_path / "s.h5"
    cli(*args_for(images, store))
    os.truncate(store, store.stat().st_size // 2)  # a copy cut short
    before = sha256(store)
    with pytest.raises(UserError, match="is a damaged HDF5 file"):
        FeatureStore(store)
    for extra in ([], ["--overwrite"]):
        line = error_line(cli(*args_for(images, store, *extra), code=1).stderr)
        assert "is a damaged HDF5 file" in line and "extract replaces only a store it made" in line
    assert sha256(store) == before


# --- odd inputs ------------------------------------------------------------------------------------------------------


def test_image_names_with_a_newline_or_bytes_that_are_not_utf8(tmp_path, make_images, cli, fast):
    images = tmp_path / "imgs"
    make_images(images, ["a.jpg", "line\nbreak.jpg"])
    (images / "broken\nname.jpg").write_bytes(b"not an image")
    (images / os.fsdecode(b"latin\xe9.jpg")).write_bytes((images / "a.jpg").read_bytes())  # on disk, uncaptioned
    data = {"images": [{"filename": n, "split": "train", "sentences": [{"raw": f"picture {i}"}]}
                       for i, n in enumerate(["a.jpg", "line\nbreak.jpg", "broken\nname.jpg"])]}  # fmt: skip
    (images / "dataset_flickr8k.json").write_text(json.dumps(data))
    result = cli(*args_for(images, tmp_path / "s.h5"))
    assert "warning: 1 images on disk with no caption (not extracted)" in result.stderr
    assert "warning: skipped broken\\nname.jpg: cannot decode it" in result.stderr  # one line
    assert "done: 2 images written, 1 skipped" in result.stdout
    with FeatureStore(tmp_path / "s.h5") as s:
        assert s.images == ["a.jpg", "broken\nname.jpg", "line\nbreak.jpg"]


def test_a_symlink_loop_in_the_images_folder(tmp_path, make_flickr8k, cli, fast):
    images = make_flickr8k(tmp_path / "imgs", 2)
    (images / "loop").symlink_to(images, target_is_directory=True)
    (images / "l1").symlink_to(images / "l2")
    (images / "l2").symlink_to(images / "l1")
    result = cli(*args_for(images, tmp_path / "s.h5"))
    assert "done: 2 images written" in result.stdout


# --- 16-bit and other unusual pixel formats ------------------------------------------------------------------------


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey PNGs, but not 16-bit RGB or RGBA ones)."""
    import struct
    import zlib

    h, w, c = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_images_are_scaled_to_8_bits(tmp_path, cli, fast):
    from pipeline.transform import open_image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(grey).save(d / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "grey16.png")  # mode I;16
    Image.frombytes("I;16B", (64, 48), (grey.astype(">u2") * 257).tobytes()).save(d / "grey16b.tif")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "grey16.pgm")  # read back as mode I
    Image.fromarray(rgb).save(d / "rgb8.png")
    _png16(d / "rgb16.png", rgb.astype(np.uint16) * 257)
    _png16(d / "rgba16.png", np.concatenate([rgb, np.full((48, 64, 1), 7, np.uint8)], axis=-1).astype(np.uint16) * 257)
    _png16(d / "la16.png", np.stack([grey, np.full_like(grey, 9)], axis=-1).astype(np.uint16) * 257)

    expected_grey = np.asarray(open_image(d / "grey8.png"))
    assert expected_grey.mean() < 200  # not the almost-white picture Pillow's own conversion gives
    for name in ("grey16.png", "grey16b.tif", "grey16.pgm", "la16.png"):
        with Image.open(d / name) as im:
            assert im.mode in ("I;16", "I;16B", "I", "LA", "RGBA"), (name, im.mode)
        np.testing.assert_array_equal(np.asarray(open_image(d / name)), expected_grey, err_msg=name)
    for name in ("rgb16.png", "rgba16.png"):
        np.testing.assert_array_equal(np.asarray(open_image(d / name)), np.asarray(open_image(d / "rgb8.png")))

    # ... and through extract: the features of a 16-bit image are those of its 8-bit version.
    (d / "captions.txt").write_text("image,caption\n" + "".join(f"{p.name},a picture\n" for p in sorted(d.iterdir())))
    cli(*args_for(d, tmp_path / "s.h5"))
    with FeatureStore(tmp_path / "s.h5") as s:
        rows = {n: i for i, n in enumerate(s.images)}
        f = np.asarray(s.features, dtype=np.float32)
        assert (s.status == WRITTEN).all()
    for name in ("grey16.png", "grey16b.tif", "grey16.pgm", "la16.png"):
        np.testing.assert_allclose(f[rows[name]], f[rows["grey8.png"]], rtol=1e-3, atol=1e-3, err_msg=name)
    assert np.abs(f[rows["rgb8.png"]] - f[rows["grey8.png"]]).max() > 0.01


def test_one_bit_palette_transparency_and_alpha(tmp_path, recwarn):
    from pipeline.transform import open_image

    rgb = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "bits.png")
    assert set(np.unique(np.asarray(open_image(tmp_path / "bits.png")))) == {0, 255}
    # Alpha is dropped: transparent pixels show the colour stored under them.
    Image.fromarray(np.concatenate([rgb, np.zeros((48, 64, 1), np.uint8)], axis=-1)).save(tmp_path / "clear.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "clear.png")), rgb)
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png", transparency=bytes([0, 128]))
    with Image.open(tmp_path / "palette.png") as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "palette.png")), expected)
    assert not [w for w in recwarn if "Transparency" in str(w.message)]  # no stray warning line in extract


def test_a_damaged_cached_imagenet_file_is_one_error_line(tmp_path, make_flickr8k, cli, monkeypatch):
    from pipeline.encoder import imagenet_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = imagenet_weights_file("IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 half a download")
    images = make_flickr8k(tmp_path / "imgs", 1)
    result = cli("extract", "--images", images, "--store", tmp_path / "s.h5", "--weights", "IMAGENET1K_V1", code=1)
    line = error_line(result.stderr)
    assert "cannot load the cached IMAGENET1K_V1 weights" in line and "delete that file" in line
    assert not (tmp_path / "s.h5").exists()


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_a_damaged_image_file_never_stops_the_decoding(data):
    """Whatever bytes an image file holds, decoding yields its row, with status written or skipped."""
    import tempfile

    from pipeline.extract import ImageFiles
    from pipeline.transform import TransformConfig

    fmt = data.draw(st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"]))
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3)).save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 8))):  # flip bytes, mostly in the header
        i = data.draw(st.integers(0, min(len(raw), 64) - 1) | st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "x").write_bytes(bytes(raw))
        row, pixels, status, reason = ImageFiles(Path(folder), ["x"], np.array([0]), TransformConfig())[0]
    assert row == 0 and pixels.shape == (3, 224, 224) and status in (WRITTEN, SKIPPED)
    assert (status == WRITTEN) == (reason == "")


def test_a_decompression_bomb_is_skipped_for_good(tmp_path):
    """A PNG that declares 40,000 x 40,000 pixels (Pillow refuses past 2 x 89.5 M): refused from its header."""
    import struct
    import zlib

    from pipeline.extract import ImageFiles
    from pipeline.transform import TransformConfig

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 40_000, 40_000, 1, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    _, _, status, reason = ImageFiles(tmp_path, ["bomb.png"], np.array([0]), TransformConfig())[0]
    assert status == SKIPPED and reason.startswith("DecompressionBombError")
