"""The file-safety primitives every command uses: atomic replacement, stale temps, the one-writer lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.files import atomic_write, check_writable_folder, exclusive, remove_stale_temps, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "the temp file must not stay behind"
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_write_failure_is_one_user_error_and_no_temp(tmp_path):
    """EFBIG (a file-size limit, as a full disk would) while writing: UserError, the old file intact."""
    target = tmp_path / "out.json"
    target.write_text("old")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from pipeline.files import write_text_atomic\n"
        "from pipeline.errors import UserError\n"
        "try:\n"
        f"    write_text_atomic({str(target)!r}, 'x' * 100000)\n"
        "except UserError as e:\n"
        "    print('error:', e); sys.exit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith(f"error: cannot write {target}") and "File too large" in r.stdout
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".last.pt.tmp-{os.getppid()}"  # a live process's temp file is left alone
    live.write_bytes(b"x")
    other = tmp_path / ".notes.txt.tmp-1"
    other.write_bytes(b"x")
    assert remove_stale_temps(target) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def _hold_lock(path: Path) -> subprocess.Popen:
    code = (
        "import signal, sys, time\n"
        # Ctrl-C raises KeyboardInterrupt even when the suite runs as a background job (`pytest &`), whose
        # processes inherit SIGINT ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from pipeline.files import exclusive\n"
        f"with exclusive({str(path)!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    store = tmp_path / "features.h5"
    holder = _hold_lock(store)
    try:
        with pytest.raises(UserError, match=rf"in use by another process \(pid {holder.pid}\)"), exclusive(store):
            pass
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released it: the next writer gets the lock at once, and leaves no lock file behind
    with exclusive(store):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_users_lock_file_is_never_taken_for_ours(tmp_path):
    """`OUT/.lock` of another tool (`fit --out` and `demo --out` lock OUT with that name) was truncated, filled
    with our pid, then deleted. A lock file holding anything but a pid is refused and left as it is; one left by
    a killed run of ours (a pid, or empty) is reused."""
    for content in ("another tool's lock\n", "12345 held by someone else"):
        (tmp_path / ".lock").write_text(content)
        with pytest.raises(UserError, match="not a lock file of captioner"), exclusive(tmp_path, "--out"):
            pass
        assert (tmp_path / ".lock").read_text() == content
    for stale in ("999999999", ""):
        (tmp_path / ".lock").write_text(stale)
        with exclusive(tmp_path, "--out"):
            assert (tmp_path / ".lock").read_text() == str(os.getpid())
        assert not (tmp_path / ".lock").exists()


def test_lock_is_released_on_ctrl_c(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    holder.send_signal(signal.SIGINT)
    holder.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with exclusive(tmp_path / "run"):
                break
        except UserError:
            time.sleep(0.1)
    else:
        pytest.fail("lock still held after the holder was interrupted")


def test_check_writable_folder(tmp_path):
    assert check_writable_folder(tmp_path / "a" / "b", "--out").is_dir()
    afile = tmp_path / "file"
    afile.write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable_folder(afile, "--out")
    with pytest.raises(UserError, match="cannot write in --out"):
        check_writable_folder(afile / "sub", "--out")  # under a file: NotADirectoryError, even for root
    assert afile.read_text() == "mine"
