"""fit: the batches it reads, training, checkpoints, metrics, resume (also after SIGKILL) and refusals.

Stores are built by tests/helpers_store.py (no ResNet50). Most runs use the "tiny" decoder preset (embed 16,
hidden 32, attention 16; the store's 2048 feature channels unchanged), chosen through the config or
`--decoder tiny`, so that many epochs fit in a CPU test budget: what is tested (batches, RNG and optimizer
state, checkpoints, files) does not depend on the layer sizes. One test trains the report's full-size decoder.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from assertions import assert_same
from helpers_store import ROOT, class_captions, make_store

from pipeline import checkpoint
from pipeline.data import Batches
from pipeline.encoder import WeightsInfo
from pipeline.errors import UserError
from pipeline.train import TrainConfig, fit, prepare
from pipeline.vocab import END_ID, PAD_ID, START_ID

CPU = torch.device("cpu")


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    """A small fit: the tiny decoder, batches of 7, no CIDEr-D decoding."""
    base = {
        "store": str(store),
        "out": str(out),
        "epochs": 2,
        "batch_size": 7,
        "lr": 1e-2,
        "device": "cpu",
        "min_word_count": 1,
        "val_decode_images": 0,
        "decoder": "tiny",
    }
    return TrainConfig(**(base | kw))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _fit_args(store: Path, out: Path, *extra: str, val_decode: int = 0) -> list[str]:
    """`cli.py fit` arguments of a small fit (as `_cfg`)."""
    return [
        "fit",
        "--decoder",
        "tiny",
        "--store",
        str(store),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "7",
        "--lr",
        "0.01",
        "--min-word-count",
        "1",
        "--val-decode-images",
        str(val_decode),
        *extra,
    ]


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.fixture(scope="module")
def store20(tmp_path_factory):
    """20 images (14 train / 3 val / 3 test), 5 captions each, classes learnable from the features."""
    return make_store(tmp_path_factory.mktemp("store") / "features.h5", n_images=20)


# -- the batches ---------------------------------------------------------------------------------------


def _batches(store, k: int = 1, batch_size: int = 4) -> tuple[Batches, object]:
    data = prepare(_cfg(store.path, Path("unused")))
    return Batches(data.store, data.captions, data.train_rows, batch_size, k, CPU), data


def _normalised(vocab, text: str) -> str:
    return vocab.decode(vocab.encode(text))


def test_batches_gather_feature_rows_and_their_own_captions(store20):
    batches, data = _batches(store20, k=2)
    memmap = data.store.features
    seen = []
    for batch in batches.iterate(epoch=1, seed=0):
        seen.extend(batch.rows.tolist())
        assert batch.features.dtype == torch.float16
        np.testing.assert_array_equal(batch.features.numpy(), memmap[batch.rows])
        np.testing.assert_array_equal(batch.features.numpy(), store20.features[batch.rows])  # what was written
        assert batch.tokens.dtype == torch.int64 and batch.tokens.shape[:2] == (len(batch.rows), 2)
        assert (batch.tokens[..., 0] == START_ID).all()
        assert int((batch.tokens != PAD_ID).sum(-1).max()) == batch.tokens.shape[-1]  # trimmed to the longest
        for row, caps in zip(batch.rows, batch.tokens, strict=True):
            own = {_normalised(data.vocab, c) for c in store20.captions[row]}
            for cap in caps:
                assert END_ID in cap.tolist()
                assert data.vocab.decode(cap.tolist()) in own
    assert sorted(seen) == sorted(data.train_rows.tolist())  # each training image exactly once
    assert len(seen) == len(set(seen)) == 14


def test_batches_pick_distinct_captions_and_all_of_a_short_list(tmp_path):
    captions = [[f"caption {w} of picture" for w in ("one", "two", "three", "four", "five")]] * 10
    captions[0] = ["only one of picture", "only two of picture"]  # fewer than K
    captions[1] = ["single caption picture"]
    store = make_store(tmp_path / "s.h5", n_images=10, captions=captions, splits=["train"] * 10)
    batches, data = _batches(store, k=3, batch_size=3)
    for epoch in (1, 2, 3):
        for rows, picks in batches.plan(epoch, seed=0):
            for row, pick in zip(rows, picks, strict=True):
                texts = [data.vocab.decode(data.captions.ids[p]) for p in pick]
                own = [_normalised(data.vocab, c) for c in store.captions[row]]
                assert set(texts) <= set(own)
                assert len(set(texts)) == min(3, len(own)), (row, texts)


def test_batch_plan_depends_on_seed_and_epoch_only(store20):
    a, _ = _batches(store20, k=2)
    b, _ = _batches(store20, k=2)

    def flat(plan):
        return [(r.tolist(), p.tolist()) for r, p in plan]

    assert flat(a.plan(3, seed=5)) == flat(b.plan(3, seed=5))
    assert flat(a.plan(3, seed=5)) != flat(a.plan(4, seed=5))
    assert flat(a.plan(3, seed=5)) != flat(a.plan(3, seed=6))
    fixed = flat(a.plan(None, seed=0))
    assert fixed == flat(a.plan(None, seed=9))
    assert [r for rows, _ in fixed for r in rows] == sorted(a.rows.tolist())
    # batches come out in the planned order with the planned captions
    for batch, (rows, picks) in zip(a.iterate(3, seed=5), a.plan(3, seed=5), strict=True):
        np.testing.assert_array_equal(batch.rows, rows)
        ids = a.captions.ids[picks][..., : batch.tokens.shape[-1]]
        np.testing.assert_array_equal(batch.tokens.numpy(), ids)


def test_an_epoch_broken_off_stops_its_prefetch_thread_before_the_interpreter_ends(store20, subprocess_env):
    """Ctrl-C in the middle of an epoch leaves the batch generator open (the traceback holds its frame), and
    its prefetch thread ran into the interpreter's finalisation, which freezes it wherever it is: inside
    h5py's global lock, fit then hung at exit (seen once in CI). The thread is stopped before that."""
    script = f"""
import atexit, sys, threading
def check():  # registered first, so it runs after pipeline.data's own exit handler
    alive = [t.name for t in threading.enumerate() if t.name == "batches-prefetch"]
    print("alive:", alive, flush=True)
atexit.register(check)
sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
from test_fit import _batches
from helpers_store import make_store
import pathlib
class S: path = pathlib.Path({str(store20.path)!r})
batches, _ = _batches(S, batch_size=1)
it = batches.iterate(epoch=1, seed=0)
next(it)
try:
    raise KeyboardInterrupt
except KeyboardInterrupt as e:
    kept = e  # the traceback, and with it the open generator, live on, as after fit's Ctrl-C
print("epoch broken off", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=subprocess_env)
    assert out.returncode == 0, out.stderr
    assert "epoch broken off" in out.stdout and "alive: []" in out.stdout, out.stdout + out.stderr


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # fit printed it on GPUs
def test_resident_features_give_the_same_batches_as_the_memory_map(store20):
    """The GPU path (features copied once, gathered there) exercised on the CPU, in chunks of 3 rows."""
    mapped, _ = _batches(store20, k=2)
    resident, _ = _batches(store20, k=2)
    resident.make_resident(chunk=3)
    assert resident.resident is not None and resident.resident.shape == (14, 7, 7, 2048)
    for a, b in zip(mapped.iterate(2, seed=1), resident.iterate(2, seed=1), strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        assert torch.equal(a.features, b.features) and torch.equal(a.tokens, b.tokens)


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_decoder_learns_and_writes_loadable_checkpoints(store20, tmp_path):
    """The report's decoder (2048/300/512/256) on learnable synthetic data: losses fall epoch after epoch."""
    out = tmp_path / "out"
    record = fit(_cfg(store20.path, out, epochs=3, lr=3e-3, decoder="report"))
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert record["epoch"] == 3 and record["val_loss"] == metrics[-1]["val_loss"]
    for m in metrics:
        for key in ("train_loss", "val_loss", "seconds", "samples_per_second"):
            assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, (key, m)
        assert round(m["samples_per_second"] * m["seconds"]) == 14  # one caption of each training image
    train = [m["train_loss"] for m in metrics]
    val = [m["val_loss"] for m in metrics]
    assert train[-1] < train[0] - 0.2, train
    assert all(b < a for a, b in zip(val, val[1:], strict=False)), val
    assert val[-1] < val[0] - 0.2, val

    best, last = _load(out / "model.pt"), _load(out / "last.pt")
    for ckpt in (best, last):
        report = {"feature_dim": 2048, "embed_dim": 300, "hidden_dim": 512, "attention_dim": 256}
        assert {k: ckpt["model_config"][k] for k in report} == report
        assert ckpt["model_config"]["vocab_size"] == len(ckpt["vocab"])
        assert not ckpt["model_config"]["init_from_features"] and not ckpt["model_config"]["gate"]
        assert ckpt["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "yellow" in ckpt["vocab"]
    # each input channel standardised with the train split's statistics, held in the checkpoint
    train_feats = store20.features[[i for i, sp in enumerate(store20.splits) if sp == "train"]].astype(np.float64)
    cells = train_feats.reshape(-1, train_feats.shape[-1])
    assert last["model_config"]["feature_norm"] and last["model_config"]["feature_scale"] == 1.0
    np.testing.assert_allclose(last["model"]["feature_mean"].numpy(), cells.mean(0), rtol=1e-4, atol=1e-6)
    std = np.maximum(cells.std(0), 0.1 * np.median(cells.std(0)))  # no channel amplified over 10x the typical
    np.testing.assert_allclose(1 / last["model"]["feature_inv_std"].numpy(), std, rtol=1e-4)
    assert last["epoch"] == 3 and best["epoch"] == 3  # val loss fell every epoch: the last is the best
    assert {"optimizer", "scheduler", "rng"} <= last.keys()
    _assert_same_weights(best["model"], last["model"])
    model, vocab = checkpoint.build_decoder(checkpoint.load(out / "model.pt"))
    assert vocab.to_list() == best["vocab"] and not model.training


# The run that resumed runs must reproduce: dropout masks (torch RNG), caption choice (2 of 5 per image),
# Adam state and the model.pt chosen by validation CIDEr-D all have to carry over a resume.
# The warm-up (2 steps an epoch here) runs into epoch 3: a resume after epoch 2 continues the ramp.
RESUMED = {"epochs": 4, "captions_per_image": 2, "dropout": 0.3, "val_decode_images": 2, "warmup_steps": 6}
RESUMED_ARGS = ("--dropout", "0.3", "--captions-per-image", "2", "--warmup-steps", "6")


@pytest.fixture(scope="module")
def uninterrupted(store20, tmp_path_factory) -> Path:
    """OUT of an uninterrupted `fit --epochs 4` with the RESUMED settings (tiny decoder)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    fit(_cfg(store20.path, out, **RESUMED))
    return out


def _assert_same_run(reference: Path, out: Path) -> None:
    """`out` ended exactly where the uninterrupted run did: weights, optimizer, RNG, best model, metrics."""
    full, resumed = _load(reference / "last.pt"), _load(out / "last.pt")
    assert resumed["epoch"] == full["epoch"] == RESUMED["epochs"]
    _assert_same_weights(full["model"], resumed["model"])
    for key in ("optimizer", "scheduler", "best", "rng"):
        assert_same(full[key], resumed[key], key)
    best_full, best_resumed = _load(reference / "model.pt"), _load(out / "model.pt")
    assert best_full["epoch"] == best_resumed["epoch"] == full["best"]["epoch"]
    assert full["best"]["metric"] == "val_cider_d"
    _assert_same_weights(best_full["model"], best_resumed["model"])
    mf, mr = _metrics(reference), _metrics(out)
    assert [m["epoch"] for m in mr] == [1, 2, 3, 4]  # no line repeated by a redone epoch
    for a, b in zip(mf, mr, strict=True):
        for key in ("train_loss", "val_loss", "val_cider_d", "sample", "lr"):
            assert a[key] == b[key], (key, a["epoch"])


def test_each_epochs_last_pt_holds_that_epochs_weights_though_written_while_the_next_trains(
    store20, tmp_path, monkeypatch
):
    """The epoch's files are written by another thread while the next epoch trains: what it writes is a copy
    taken when the epoch ended (each write here is held back 0.2 s, so that a shared tensor would have moved)."""
    import pipeline.train.recipe as recipe
    import pipeline.train.run_folder as run_folder

    at_end, written = [], []
    real_save_epoch, real_save = run_folder.save_epoch, run_folder.checkpoint.save

    def save_epoch(files, state, *args, **kwargs):
        at_end.append(state.model.decoder.gates.weight.detach().clone())
        return real_save_epoch(files, state, *args, **kwargs)

    def save(state, path):
        if Path(path).name == "last.pt":
            time.sleep(0.2)
            written.append(state["model"]["gates.weight"].clone())
        return real_save(state, path)

    monkeypatch.setattr(recipe, "save_epoch", save_epoch)
    monkeypatch.setattr(run_folder.checkpoint, "save", save)
    fit(_cfg(store20.path, tmp_path / "out", epochs=3))
    assert len(written) == len(at_end) == 3
    assert all(torch.equal(a, b) for a, b in zip(at_end, written, strict=True))
    assert not torch.equal(written[0], written[1])


def test_warm_up_scales_the_rates_of_the_first_steps_only_and_restores_them():
    from pipeline.train.step import rate_factor, scaled_rates

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-4}])
    seen = []
    for step in range(6):
        with scaled_rates(opt, rate_factor(step, 100, 4, "constant")):
            seen.extend(g["lr"] for g in opt.param_groups)
    expected = [lr * k / 4 for k in (1, 2, 3, 4) for lr in (1e-3, 1e-4)] + [1e-3, 1e-4] * 2
    assert seen == pytest.approx(expected)
    with pytest.raises(RuntimeError), scaled_rates(opt, 0.25):
        raise RuntimeError("a failed step")
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]  # what the scheduler and last.pt see


def test_cosine_schedule_falls_from_the_rate_to_zero_over_the_run_after_the_warm_up():
    from pipeline.train.step import rate_factor

    factors = [rate_factor(step, 100, 10, "cosine") for step in range(100)]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 100)) for k in range(100)]
    assert factors[:10] == pytest.approx([(k + 1) / 10 * cosine[k] for k in range(10)])
    assert factors[10:] == pytest.approx(cosine[10:])
    assert all(a > b for a, b in zip(factors[10:], factors[11:], strict=False))  # falls after the warm-up
    assert factors[50] == pytest.approx(0.5) and factors[-1] < 0.001
    assert rate_factor(150, 100, 10, "cosine") == 0.0  # clamped at the end
    assert rate_factor(50, 100, 0, "constant") == 1.0


def test_warm_up_makes_the_first_updates_smaller(store20, tmp_path):
    """One epoch (2 steps) with a 100-step warm-up moves the weights about 1.5% as far as without."""
    fit(_cfg(store20.path, tmp_path / "init", epochs=1, lr=1e-12))  # the same initial weights, barely moved
    init = _load(tmp_path / "init" / "last.pt")["model"]["gates.weight"]
    moved = {}
    for warmup in (0, 100):
        out = tmp_path / f"w{warmup}"
        fit(_cfg(store20.path, out, epochs=1, warmup_steps=warmup))
        moved[warmup] = float((_load(out / "last.pt")["model"]["gates.weight"] - init).abs().mean())
    assert 0 < moved[100] < 0.1 * moved[0], moved


def test_resume_continues_exactly_where_an_uninterrupted_run_ends(store20, uninterrupted, tmp_path):
    """fit --epochs 2, then fit --epochs 4 --resume == fit --epochs 4."""
    out = tmp_path / "split"
    fit(_cfg(store20.path, out, **(RESUMED | {"epochs": 2})))
    first = _load(out / "last.pt")
    assert first["epoch"] == 2
    # resumed: the saved settings win over these (each would change the result)
    changed = {"seed": 99, "lr": 0.5, "captions_per_image": 1, "dropout": 0.0, "val_decode_images": 0}
    fit(_cfg(store20.path, out, epochs=4, resume=True, **changed))
    assert not torch.equal(first["model"]["gates.weight"], _load(out / "last.pt")["model"]["gates.weight"])
    _assert_same_run(uninterrupted, out)


def test_resume_with_all_epochs_done_changes_nothing(store20, tmp_path):
    out = tmp_path / "out"
    fit(_cfg(store20.path, out, epochs=1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert fit(_cfg(store20.path, out, epochs=1, resume=True)) == {}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_fit_captions_per_image_3(store20, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(*_fit_args(store20.path, out, "--epochs", "2", "--captions-per-image", "3"))
    assert "epoch 2" in result.stdout
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert round(m["samples_per_second"] * m["seconds"]) == 14 * 3  # 3 captions of each training image
    last = _load(out / "last.pt")
    assert last["train_config"]["captions_per_image"] == 3 and last["epoch"] == 2
    best = _load(out / "model.pt")  # chosen by validation loss (no CIDEr-D decoding here)
    assert best["epoch"] == 1 + int(np.argmin([m["val_loss"] for m in metrics]))
    from PIL import Image

    with Image.open(out / "curves.png") as curves:  # redrawn after each epoch: loss, CIDEr-D, samples/s
        assert curves.format == "PNG" and curves.size[0] > 2 * curves.size[1]


def _files_open(out: Path) -> None:
    """Whenever the run was killed, each of its files opens (checked, as --resume and evaluate load them)."""
    for name in ("model.pt", "last.pt"):
        if (out / name).exists():
            checkpoint.load(out / name, resume=name == "last.pt")
    if (out / "metrics.jsonl").exists():
        _metrics(out)


def _lock_holder(out: Path) -> int | None:
    try:
        return int((out / ".lock").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_ends_like_an_uninterrupted_run(
    store20, uninterrupted, tmp_path, cli, subprocess_env
):
    """`cli.py fit` killed with SIGKILL three times: at a random moment, at a random moment after epoch 1's
    last.pt, and at a random moment again. After each kill every file opens, and the next command goes on:
    with --resume once last.pt exists, the same command without it before (OUT then holds none of the run's
    files). The end equals an uninterrupted run, and no temp file is left."""
    out, rng, epochs = tmp_path / "killed", random.Random(8), str(RESUMED["epochs"])
    for after_first_epoch in (False, True, False):
        resume = ("--resume",) if (out / "last.pt").exists() else ()
        args = _fit_args(store20.path, out, "--epochs", epochs, *RESUMED_ARGS, *resume, val_decode=2)
        proc = subprocess.Popen(
            [sys.executable, "cli.py", *args], cwd=ROOT, env=subprocess_env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and not (
                _lock_holder(out) == proc.pid and (not after_first_epoch or (out / "last.pt").exists())
            ):
                assert time.monotonic() < deadline, "fit did not start within 120 s"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=30)
        assert proc.returncode in (-signal.SIGKILL, 0), err.decode()
        _files_open(out)
    resume = ("--resume",) if (out / "last.pt").exists() else ()
    cli(*_fit_args(store20.path, out, "--epochs", epochs, *RESUMED_ARGS, *resume, val_decode=2))  # the same command
    _assert_same_run(uninterrupted, out)
    assert not list(out.glob(".*.tmp-*"))


# -- refusals --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(store20, tmp_path_factory):
    """An OUT folder after `fit --epochs 1` (tiny decoder)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    fit(_cfg(store20.path, out, epochs=1))
    return out


@pytest.fixture
def trained_copy(trained, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_refuses_missing_store(tmp_path, cli):
    result = cli(*_fit_args(tmp_path / "nope.h5", tmp_path / "out", "--epochs", "1"), code=1)
    assert "nope.h5" in _error_line(result)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_refuses_incomplete_store(tmp_path, cli):
    store = make_store(tmp_path / "s.h5", n_images=8, finish=False)
    result = cli(*_fit_args(store.path, tmp_path / "out", "--epochs", "1"), code=1)
    assert "incomplete" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_refuses_store_without_train_split(tmp_path, cli):
    store = make_store(tmp_path / "s.h5", n_images=6, splits=["val", "test"] * 3)
    result = cli(*_fit_args(store.path, tmp_path / "out", "--epochs", "1"), code=1)
    assert "train" in _error_line(result)


def test_refuses_resume_without_last_pt(store20, tmp_path, cli):
    result = cli(*_fit_args(store20.path, tmp_path / "out", "--epochs", "2", "--resume"), code=1)
    assert "last.pt" in _error_line(result)


def test_refuses_to_overwrite_an_earlier_run_without_resume(store20, trained_copy, cli):
    before = _snapshot(trained_copy)
    result = cli(*_fit_args(store20.path, trained_copy, "--epochs", "2"), code=1)
    assert "--resume" in _error_line(result)
    assert _snapshot(trained_copy) == before


def test_refuses_resume_on_a_store_with_other_captions(trained_copy, tmp_path, cli):
    captions = [[*class_captions(i % 4), "a purple hexagon"] for i in range(20)]  # new words in train
    other = make_store(tmp_path / "other.h5", n_images=20, captions=captions)
    before = _snapshot(trained_copy)
    result = cli(*_fit_args(other.path, trained_copy, "--epochs", "2", "--resume"), code=1)
    assert "vocabulary" in _error_line(result)
    assert _snapshot(trained_copy) == before


@pytest.mark.parametrize(
    "kw",
    [{"weights": WeightsInfo("file", "ab" * 32, "/elsewhere/resnet50.pth")}, {"dtype": "float32"}],
    ids=["weights", "dtype"],
)
def test_refuses_resume_on_a_store_made_differently(trained_copy, tmp_path, cli, kw):
    other = make_store(tmp_path / "other.h5", n_images=20, **kw)  # same images and captions
    before = _snapshot(trained_copy)
    result = cli(*_fit_args(other.path, trained_copy, "--epochs", "2", "--resume"), code=1)
    line = _error_line(result)
    assert "made differently" in line and next(iter(kw)) in line
    assert _snapshot(trained_copy) == before


def test_resume_on_an_identical_store_copy_is_accepted(store20, trained_copy, tmp_path, cli):
    """The control for the refusals above: same provenance and captions in another file resume fine."""
    copy = tmp_path / "copy.h5"
    shutil.copyfile(store20.path, copy)
    cli(*_fit_args(copy, trained_copy, "--epochs", "2", "--resume"))
    assert _load(trained_copy / "last.pt")["epoch"] == 2


def test_resume_refuses_typed_options_that_last_pt_decides(store20, trained_copy, cli):
    """`--resume --decoder report --lr 5` on a tiny run at --lr 0.01 used to continue the tiny run at 0.01 without
    a word: each typed option that last.pt decides is named with last.pt's value, and nothing is written."""
    before = _snapshot(trained_copy)
    args = ["fit", "--store", store20.path, "--out", trained_copy, "--epochs", "2", "--resume", "--device", "cpu"]
    line = _error_line(cli(*args, "--decoder", "report", "--lr", "5", "--gate", code=1))
    assert "--decoder report (last.pt: tiny)" in line and "--lr 5.0 (last.pt: 0.01)" in line
    assert "--gate (last.pt: --no-gate)" in line and "--epochs" not in line and "--device" not in line
    assert _snapshot(trained_copy) == before
    # the same values as last.pt's are accepted, and the schedule options (--epochs, --device) are honoured
    cli(*args, "--decoder", "tiny", "--lr", "0.01", "--no-gate")
    assert _load(trained_copy / "last.pt")["epoch"] == 2


def test_usage_error_exits_2(store20, tmp_path, cli):
    result = cli(*_fit_args(store20.path, tmp_path / "out", "--epochs", "0"), code=2)
    assert "error:" not in result.stdout


@pytest.mark.slow
def test_compile_trains_the_same_model_without_compiling_again_for_each_caption_length(tmp_path):
    """fit --compile compiles the decoder's cell with a dynamic batch dimension: the losses are the eager ones,
    and captions of many lengths (here 1 to 12 words) cause no recompilation beyond the first ones (the
    whole-loss compile it replaces hit torch's limit of 8 within an epoch, and then ran uncompiled)."""
    import torch._dynamo

    rng = random.Random(0)
    words = ["a", "red", "blue", "dog", "cat", "runs", "on", "the", "grass", "near", "big", "tree"]
    captions = [[" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(2)] for _ in range(40)]
    store = make_store(tmp_path / "s.h5", n_images=40, captions=captions)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / f"compile{compiled}"
        fit(TrainConfig(store=str(store.path), out=str(out), epochs=2, batch_size=4, device="cpu", seed=0,
                        min_word_count=1, decoder="tiny", val_decode_images=0, compile=compiled))  # fmt: skip
        runs[compiled] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if compiled:  # the old whole-loss compile: 27 frames compiled, and "recompile limit exceeded"
            counters = torch._dynamo.utils.counters
            assert counters["frames"]["total"] == counters["frames"]["ok"] <= 8, dict(counters["frames"])
            assert not counters["unimplemented"], list(counters["unimplemented"])
    for eager, compiled in zip(runs[False], runs[True], strict=True):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
        assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)


def test_two_first_states_are_refused_with_the_option_that_resolves_it():
    TrainConfig(init_from_features=True, init_from_grid=0).validate()  # SAT's mean feature alone
    with pytest.raises(UserError, match="add --init-from-grid 0"):
        TrainConfig(init_from_features=True).validate()  # and the default state from the grid
    for bad in ({"init_from_grid": -1}, {"init_from_grid": 100_000}, {"init_drop": 1.0}, {"init_drop": math.nan}):
        with pytest.raises(UserError, match=r"--init-from-grid must be in \[0, 2048\], --init-drop in"):
            TrainConfig(**bad).validate()


def test_a_checkpoint_from_before_channel_statistics_loads_decodes_and_resumes_as_trained(store20, tmp_path):
    """Checkpoints written before --feature-norm hold `feature_scale` (1/RMS) alone, and a train_config whose
    `feature_scale` is a bool; nor do they know --init-from-grid. They decode as they did, and --resume
    continues them with the one scale and the zero state."""
    out = tmp_path / "old"
    fit(_cfg(store20.path, out, epochs=1, feature_norm="rms", init_from_grid=0))
    for name in ("last.pt", "model.pt"):  # rewrite them as the older version wrote them
        ckpt = _load(out / name)
        del ckpt["model_config"]["feature_norm"]
        del ckpt["train_config"]["feature_norm"]
        for key in ("init_from_grid", "grid_cells", "init_drop"):
            del ckpt["model_config"][key]
            ckpt["train_config"].pop(key, None)
        ckpt["train_config"]["feature_scale"] = True
        torch.save(ckpt, out / name)
    old = _load(out / "model.pt")
    assert old["model_config"]["feature_scale"] != 1.0 and "feature_mean" not in old["model"]
    model, _ = checkpoint.build_decoder(checkpoint.load(out / "model.pt"))
    assert not model.cfg.feature_norm and model.cfg.feature_scale == old["model_config"]["feature_scale"]

    # a schedule it did not have is refused, not applied to it: it trained at a constant rate, without warm-up
    for option in ({"lr_schedule": "cosine"}, {"warmup_steps": 5}, {"init_from_grid": 8}):
        ckpt = _load(out / "last.pt")
        ckpt["train_config"] = {
            k: v for k, v in ckpt["train_config"].items() if k not in ("lr_schedule", "warmup_steps")
        }
        torch.save(ckpt, out / "last.pt")
        with pytest.raises(UserError, match="last.pt: (constant|0)\\)"):
            fit(_cfg(store20.path, out, epochs=2, resume=True, typed=tuple(option), **option))
    fit(_cfg(store20.path, out, epochs=2, resume=True))
    resumed = _load(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["train_config"]["feature_norm"] == "rms"
    assert resumed["train_config"]["init_from_grid"] == 0 and "grid_mean" not in resumed["model"]
    assert resumed["model_config"]["feature_scale"] == old["model_config"]["feature_scale"]
    assert "feature_mean" not in resumed["model"]
