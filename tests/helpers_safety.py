"""The shared parts of the safety tests of fit, evaluate, generate and demo (issue 8; tests/train/test_fit_safety.py,
tests/cli/test_evaluate_generate_safety.py, tests/demo/test_demo_safety.py): the tiny fit's options, the one
`error:` line check, snapshots and temp files of a folder, a CLI process and waiting on it, a file size limit,
hostile checkpoints, and the fixtures `store`, `trained` and `photos` (made fixtures by
tests/conftest.py; `store` and `trained` are module-scoped, so each module that asks builds its own).
"""

from __future__ import annotations

import json
import pickle
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

from pipeline import checkpoint
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


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk

    return preexec


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
