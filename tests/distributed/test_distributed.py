"""fit and extract under torchrun (CPU, gloo, 2 processes), and the single process left as it was.

Each torchrun job spends most of its time importing torch in every process, so the cases share one job of
tests/distributed/ddp_scenarios.py, which runs several CLI commands in turn (a fit, resumes across process counts, a
refusal, extract fresh and resumed) and the collectives; the dead-rank case runs `torchrun cli.py fit` itself,
the real entry point. The rendezvous is `--standalone` (a free localhost port): parallel runs never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from assertions import assert_same
from helpers_store import ROOT, make_store

from pipeline import distributed
from pipeline.data import Batches, feature_stats
from pipeline.loss import caption_loss
from pipeline.train import TrainConfig, build_model, fit, make_optimizer, prepare

CPU = torch.device("cpu")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# the settings of the resumed runs: dropout (per-rank masks), 2 captions an image, CIDEr-D decoding split
RESUMED = ("--dropout", "0.3", "--captions-per-image", "2", "--val-decode-images", "3")
# the runs compared with one process: no random init-drop (like dropout, each rank draws its own images' masks,
# so that two processes train the one process's model only in distribution)
EXACT = ("--init-drop", "0")


def _fit_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--decoder", "tiny", "--store", str(store), "--out", str(out), "--device", "cpu",
        "--lr", "0.01", "--min-word-count", "1", *extra,
    ]  # fmt: skip


def _extract_args(images: Path, store: Path) -> list[str]:
    return ["extract", "--images", str(images), "--store", str(store), "--weights", "none", "--device", "cpu",
            "--batch-size", "2"]  # fmt: skip


def _torchrun(env: dict, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def env(subprocess_env) -> dict:
    """A torchrun environment: one thread a process (torchrun's own default, without its warning)."""
    clean = {k: v for k, v in subprocess_env.items() if k not in TORCHRUN_ENV}
    return clean | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def store20(tmp_path_factory):
    """20 images: 14 train, 3 val, 3 test (tests/helpers_store.py)."""
    return make_store(tmp_path_factory.mktemp("store") / "features.h5", n_images=20)


# -- the plan: shares of the epoch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "batch", "world"), [(14, 4, 2), (14, 7, 2), (15, 2, 2), (17, 3, 3), (5, 4, 4), (13, 3, 2), (14, 4, 3)]
)
def test_shares_are_disjoint_cover_the_epoch_and_run_the_same_steps(store20, images, batch, world):
    """Every rank draws the same permutation; the ranks' rows are disjoint, cover the epoch, every rank runs
    the same number of steps, and each step's union is the one-process batch of batch x world images with
    the same captions (a last one with fewer images than ranks joins the step before)."""
    data = prepare(TrainConfig(store=str(store20.path), min_word_count=1))
    rows = np.arange(images)
    ranks = [Batches(data.store, data.captions, rows, batch, 2, CPU, r, world) for r in range(world)]
    single = Batches(data.store, data.captions, rows, batch * world, 2, CPU)
    for epoch in (1, 2):
        plans = [b.plan(epoch, seed=3) for b in ranks]
        assert len({len(p) for p in plans}) == 1 and all(len(p) == len(b) for p, b in zip(plans, ranks, strict=True))
        seen = [i for p in plans for r, _ in p for i in r.tolist()]
        assert sorted(seen) == rows.tolist()  # disjoint (no repeats) and covering
        for parts in zip(*[b._steps(epoch, 3) for b in ranks], strict=True):
            assert all(len(r) >= 1 for r, _, _ in parts)  # no rank idles through a step
            assert sum(w for _, _, w in parts) == pytest.approx(world)  # token shares x world
        whole = [(r.tolist(), p.tolist()) for r, p in single.plan(epoch, seed=3)]
        if len(whole) > len(plans[0]):  # merged: the last global batch was too small to share
            assert len(whole[-1][0]) < world
            whole[-2:] = [(whole[-2][0] + whole[-1][0], whole[-2][1] + whole[-1][1])]
        assert len(whole) == len(plans[0])
        for (rows_s, picks_s), parts in zip(whole, zip(*plans, strict=True), strict=True):
            assert sorted(i for r, _ in parts for i in r.tolist()) == sorted(rows_s)
            assert sorted(tuple(p) for _, pp in parts for p in pp.tolist()) == sorted(map(tuple, picks_s))


def test_one_process_plan_is_unchanged_by_the_sharding(store20):
    data = prepare(TrainConfig(store=str(store20.path), min_word_count=1))
    a = Batches(data.store, data.captions, data.train_rows, 4, 2, CPU)
    b = Batches(data.store, data.captions, data.train_rows, 4, 2, CPU, rank=0, world=1)
    assert len(a) == 4
    for (ra, pa), (rb, pb) in zip(a.plan(2, 0), b.plan(2, 0), strict=True):
        assert np.array_equal(ra, rb) and np.array_equal(pa, pb)
    assert all(batch.weight == 1.0 for batch in a.iterate(2, 0))


# -- one process: no process group, no wrapper, the same arithmetic ---------------------------------------------


def test_one_process_fit_makes_no_group_nor_wrapper_and_equals_a_plain_loop(store20, tmp_path, monkeypatch):
    """Without torchrun, fit creates no process group and no DDP wrapper, and its weights after an epoch are
    bit for bit those of a plain loop that calls caption_loss on the decoder itself (what fit did before)."""
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a process group or DDP wrapper was made in a single process")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "__init__", refuse)
    cfg = TrainConfig(
        store=str(store20.path), out=str(tmp_path / "out"), epochs=1, batch_size=5, lr=1e-2, device="cpu",
        min_word_count=1, val_decode_images=0, decoder="tiny", dropout=0.3, captions_per_image=2,
        attention_penalty=0.5,
    )  # fmt: skip
    fit(cfg)
    assert not torch.distributed.is_initialized()
    assert "processes" not in _metrics(tmp_path / "out")[0]

    data = prepare(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(data.vocab), feature_stats(data.store.features, data.train_rows))
    optimizer = make_optimizer(model, cfg.lr)
    model.train()
    for batch in Batches(data.store, data.captions, data.train_rows, 5, 2, CPU).iterate(1, cfg.seed):
        total, _ = caption_loss(model, batch.features, batch.tokens, cfg.attention_penalty)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    assert_same(_load(tmp_path / "out" / "last.pt")["model"], {k: v.detach() for k, v in model.state_dict().items()})


def test_torchrun_environment_is_read(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert distributed.launched() is None and distributed.launched_world() == 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.launched() == distributed.Launch(3, 4, 1, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(distributed.UserError, match="inconsistent"):
        distributed.launched()


def test_each_rank_draws_its_own_dropout_masks_whatever_ran_before():
    def draws(rank: int, epoch: int) -> torch.Tensor:
        torch.rand(5)  # whatever the process drew before
        distributed.Dist(rank=rank, world=2).seed_epoch(7, epoch)
        return torch.rand(4)

    assert torch.equal(draws(1, 3), draws(1, 3))
    assert not torch.equal(draws(0, 3), draws(1, 3))
    assert not torch.equal(draws(1, 3), draws(1, 4))
    before = torch.get_rng_state()
    distributed.Dist().seed_epoch(7, 3)  # one process: its one stream goes on
    assert torch.equal(before, torch.get_rng_state())


def test_one_process_collectives_return_their_input():
    d = distributed.Dist()
    assert d.sum(1.5, 2) == (1.5, 2)
    assert d.gather_sequences([[4, 5], []], 3) == [[4, 5], []]
    assert np.array_equal(d.part(np.arange(5)), np.arange(5))
    assert d.decide(lambda: 7) == 7 and d.check(lambda: 8) == 8 and d.broadcast({"a": 1}) == {"a": 1}


# -- one torchrun job of several commands ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def images7(tmp_path_factory, make_flickr8k) -> Path:
    """7 tiny JPEGs with Flickr8k captions, one of them undecodable."""
    folder = make_flickr8k(tmp_path_factory.mktemp("images") / "flickr8k", 7)
    (folder / "1003_img.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def extracted1(images7, tmp_path_factory, cli) -> Path:
    """The store one process makes."""
    store = tmp_path_factory.mktemp("one") / "features.h5"
    cli(*_extract_args(images7, store))
    return store


@pytest.fixture(scope="module")
def layer3_store(tmp_path_factory):
    """20 images of random layer3 rows (14x14x1024), for --finetune layer4."""
    return make_store(tmp_path_factory.mktemp("layer3") / "features.h5", n_images=20, layer="layer3")


@pytest.fixture(scope="module")
def scenarios(store20, layer3_store, images7, extracted1, env, tmp_path_factory):
    """Run tests/distributed/ddp_scenarios.py under torchrun, 2 processes. Returns (results, folders)."""
    base = tmp_path_factory.mktemp("scenarios")
    names = ("ddp_fit", "ddp_finetune", "whole", "split", "split_copy", "single", "partial.h5", "fresh.h5", "scst")
    d = {name: base / name for name in names}
    fit(
        TrainConfig(
            store=str(store20.path),
            out=str(d["single"]),
            epochs=1,
            batch_size=4,
            lr=0.01,
            device="cpu",
            min_word_count=1,
            val_decode_images=3,
            decoder="tiny",
            dropout=0.3,
            captions_per_image=2,
        )
    )
    shutil.copyfile(extracted1, d["partial.h5"])
    with h5py.File(d["partial.h5"], "r+") as f:  # as if a run had been killed before these rows were done
        status = f["status"][:]
        status[[1, 4, 5]] = 0
        f["status"][:] = status
        f["features"][4:6] = 0
        f.attrs["complete"] = False
    commands = [
        (
            "ddp_fit",
            _fit_args(
                store20.path, d["ddp_fit"], "--batch-size", "4", "--epochs", "2", "--val-decode-images", "3", *EXACT
            ),
        ),  # fmt: skip
        (
            "ddp_finetune",
            _fit_args(
                layer3_store.path,
                d["ddp_finetune"],
                "--finetune",
                "layer4",
                "--batch-size",
                "4",
                "--epochs",
                "1",
                "--val-decode-images",
                "3",
                *EXACT,
            ),
        ),  # fmt: skip
        ("whole", _fit_args(store20.path, d["whole"], "--batch-size", "4", "--epochs", "2", *RESUMED)),
        ("split_1", _fit_args(store20.path, d["split"], "--batch-size", "4", "--epochs", "1", *RESUMED)),
        ("split_2", _fit_args(store20.path, d["split"], "--epochs", "2", "--resume"), [d["split"], d["split_copy"]]),
        ("single_then_2", _fit_args(store20.path, d["single"], "--epochs", "2", "--resume")),
        ("refused", _fit_args(store20.path, d["whole"], "--epochs", "3")),
        (
            "scst",
            _fit_args(
                store20.path,
                d["scst"],
                "--batch-size",
                "4",
                "--epochs",
                "2",
                "--scst-after",
                "1",
                "--val-decode-images",
                "3",
            ),
        ),  # fmt: skip
        ("extract_fresh", _extract_args(images7, d["fresh.h5"])),
        ("extract_resume", _extract_args(images7, d["partial.h5"])),
    ]
    plan = {
        "commands": [
            {"name": c[0], "args": c[1]} | ({"before": {"copy": [str(p) for p in c[2]]}} if len(c) > 2 else {})
            for c in commands
        ]
    }
    (base / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    proc = _torchrun(env, "tests/distributed/ddp_scenarios.py", str(base / "plan.json"), str(base / "result.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((base / "result.json").read_text(encoding="utf-8")), d


def _ok(results: dict, name: str) -> None:
    for rank, r in enumerate(results["commands"][name]):
        assert r["code"] == 0, (name, rank, r["stderr"])


@pytest.mark.slow
def test_two_process_fit_writes_one_set_of_files_and_one_line_per_epoch(scenarios):
    results, d = scenarios
    _ok(results, "ddp_fit")
    out = d["ddp_fit"]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "last.pt", "metrics.jsonl", "model.pt"]
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["processes"] == 2 and m["samples_per_second"] > 0 for m in metrics)
    for m in metrics:  # one caption of each of the 14 training images, counted over both ranks
        assert round(m["samples_per_second"] * m["seconds"]) == 14
    rank0, rank1 = results["commands"]["ddp_fit"]
    lines = rank0["stdout"].splitlines()
    assert sum(line.startswith("epoch 1:") for line in lines) == 1
    assert sum(line.startswith("fit: ") for line in lines) == 1 and "2 processes (global batch 8" in rank0["stdout"]
    assert rank1["stdout"] == rank1["stderr"] == rank0["stderr"] == ""  # rank 0 alone prints
    last = _load(out / "last.pt")
    assert last["epoch"] == 2 and last["train_config"]["batch_size"] == 4


@pytest.mark.slow
def test_two_process_scst_after_cross_entropy_in_one_run(scenarios):
    """The SCST step runs inside the DDP-wrapped module's forward; the cross-entropy wrapper is replaced by the
    SCST one between the phases. Rewards and baselines are averaged over the ranks, rank 0 alone prints."""
    results, d = scenarios
    _ok(results, "scst")
    metrics = _metrics(d["scst"])
    assert [m["phase"] for m in metrics] == ["xe", "scst"] and all(m["processes"] == 2 for m in metrics)
    assert metrics[1]["reward"] >= 0 and metrics[1]["baseline"] >= 0
    rank0, rank1 = results["commands"]["scst"]
    assert sum(line.startswith("epoch 2: scst reward") for line in rank0["stdout"].splitlines()) == 1
    assert rank1["stdout"] == rank1["stderr"] == ""
    assert _load(d["scst"] / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_two_process_loss_equals_one_process_with_the_global_batch(scenarios, store20, tmp_path):
    """Each rank's loss is weighted by its share of the step's tokens: the averaged gradient is the one-process
    gradient of the global batch, up to float rounding (Adam amplifies that rounding only on parameters whose
    gradient is ~0, such as the attention score's bias)."""
    out = scenarios[1]["ddp_fit"]
    one = tmp_path / "one"
    fit(TrainConfig(store=str(store20.path), out=str(one), epochs=2, batch_size=8, lr=0.01, device="cpu",
                    min_word_count=1, val_decode_images=3, decoder="tiny", init_drop=0.0))  # fmt: skip
    for a, b in zip(_metrics(one), _metrics(out), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_cider_d"] == pytest.approx(b["val_cider_d"], abs=1e-6)
    w1, w2 = _load(one / "last.pt")["model"], _load(out / "last.pt")["model"]
    for k in ("fc_out.weight", "embedding.weight", "attention.h_att.weight"):
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_two_process_finetune_equals_one_process_with_the_global_batch(scenarios, layer3_store, tmp_path):
    """fit --finetune layer4 takes the same DDP path: layer4 (BatchNorm frozen, so each image's output is its
    own) trains on each rank's share, and the averaged step is the one-process step of the global batch."""
    results, d = scenarios
    _ok(results, "ddp_finetune")
    one = tmp_path / "one"
    fit(TrainConfig(store=str(layer3_store.path), out=str(one), epochs=1, batch_size=8, lr=0.01, device="cpu",
                    min_word_count=1, val_decode_images=3, decoder="tiny", finetune="layer4",
                    init_drop=0.0))  # fmt: skip
    (a,), (b,) = _metrics(one), _metrics(d["ddp_finetune"])
    assert b["processes"] == 2 and b["encoder_trained"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    from pipeline.encoder import build_layer4

    start = build_layer4("none")[0].state_dict()  # the store's layer4 (--weights none), before training
    w1, w2 = _load(one / "last.pt")["layer4"], _load(d["ddp_finetune"] / "last.pt")["layer4"]
    assert w1.keys() == w2.keys() == start.keys()
    for k in (k for k in w1 if k.endswith("conv1.weight")):  # layer4 moved, and both runs moved it alike
        moved = (w1[k] - start[k]).norm()
        # Adam's first steps are ~lr per weight whatever the gradient's size: rounding flips the few weights
        # whose gradient is ~0, so the runs agree as updates (to 5%), not weight by weight
        assert moved > 0 and (w1[k] - w2[k]).norm() < 0.05 * moved, k


@pytest.mark.slow
def test_collectives_pad_gather_and_agree(scenarios):
    c = scenarios[0]["collectives"]
    # rank 0 held 2 sequences, rank 1 held 3, of lengths 0 to 3: padded to 5 for the gather, cut after it
    assert c["sequences"] == [[], [1], [10], [11, 11], [12, 12, 12]]
    assert c["sum"] == [1.5 + 3.0, 1]
    assert c["part"] == [[0, 1, 2, 3]]  # rank 0's share of 7 rows
    assert c["decided"] == {"rank": 0}
    assert c["decide_error"] == {"message": "rank 0 says no", "quiet": False}  # rank 0 prints it
    assert c["check_error"] == {"message": "rank 1: rank 1's store is missing", "quiet": False}


@pytest.mark.slow
def test_resume_under_torchrun_ends_where_an_uninterrupted_run_ends(scenarios):
    """2 processes: 1 epoch, then --resume to 2 == 2 epochs at once: weights, optimizer, RNG, model.pt, metrics
    (dropout masks come from (seed, epoch, rank), the batches from (seed, epoch))."""
    results, d = scenarios
    for name in ("whole", "split_1", "split_2"):
        _ok(results, name)
    whole, split = _load(d["whole"] / "last.pt"), _load(d["split"] / "last.pt")
    assert whole["epoch"] == split["epoch"] == 2
    for key in ("model", "optimizer", "scheduler", "best", "rng"):
        assert_same(whole[key], split[key], key)
    assert_same(_load(d["whole"] / "model.pt")["model"], _load(d["split"] / "model.pt")["model"])
    for a, b in zip(_metrics(d["whole"]), _metrics(d["split"]), strict=True):
        for key in ("epoch", "train_loss", "val_loss", "val_cider_d", "sample", "lr", "processes"):
            assert a[key] == b[key], key


@pytest.mark.slow
def test_resume_with_another_number_of_processes(scenarios, store20):
    """last.pt of 2 processes resumed by 1, and last.pt of 1 process resumed by 2: both complete."""
    results, d = scenarios
    _ok(results, "single_then_2")
    metrics = _metrics(d["single"])
    assert [m["epoch"] for m in metrics] == [1, 2] and "processes" not in metrics[0] and metrics[1]["processes"] == 2
    assert _load(d["single"] / "last.pt")["epoch"] == 2

    out = d["split_copy"]  # the 2-process run after its first epoch
    assert _load(out / "last.pt")["epoch"] == 1
    record = fit(TrainConfig(store=str(store20.path), out=str(out), epochs=2, resume=True, device="cpu"))
    assert record["epoch"] == 2 and "processes" not in record
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert _load(out / "last.pt")["train_config"]["batch_size"] == 4  # per process, kept from last.pt


@pytest.mark.slow
def test_refusal_under_torchrun_is_one_error_line_and_writes_nothing(scenarios):
    """Rank 0 decides before anything is written; every rank exits 1; only rank 0 prints."""
    results, d = scenarios
    rank0, rank1 = results["commands"]["refused"]
    assert rank0["code"] == rank1["code"] == 1
    assert rank1["stderr"] == ""
    lines = [line for line in rank0["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--resume" in lines[0], rank0["stderr"]
    assert _load(d["whole"] / "last.pt")["epoch"] == 2


def _assert_same_store(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert list(fa["images"][:]) == list(fb["images"][:])
        assert np.array_equal(fa["status"][:], fb["status"][:]) and list(fa["status"][:]).count(2) == 1
        ok = fa["status"][:] == 1
        x, y = fa["features"][:][ok].astype(np.float64), fb["features"][:][ok].astype(np.float64)
        # the same images in the same batches; torch's thread count changes the rounding (float16: 1 ulp)
        assert np.linalg.norm(x - y) / np.linalg.norm(x) < 1e-3
        for key in ("complete", "images_written", "images_skipped", "weights", "transform", "dtype"):
            assert fa.attrs[key] == fb.attrs[key], key
        assert fa["captions/text"][:].tolist() == fb["captions/text"][:].tolist()
        assert np.array_equal(fa["split"][:], fb["split"][:])


@pytest.mark.slow
def test_two_process_extract_equals_one_process_extract(scenarios, extracted1):
    results, d = scenarios
    _ok(results, "extract_fresh")
    _assert_same_store(extracted1, d["fresh.h5"])
    # rounds of 2 rows (set by the scenario script): rank 0 writes 4 rows, rank 1 writes 3 and waits in one
    # more round for rank 0's last: both took part in 2
    assert [r["rounds"] for r in results["commands"]["extract_fresh"]] == [2, 2]
    warnings = [r["stderr"].count("warning: skipped 1003_img.jpg") for r in results["commands"]["extract_fresh"]]
    assert sorted(warnings) == [0, 1]  # by the rank whose share holds it, once
    assert not list(d["fresh.h5"].parent.glob(".fresh.h5*"))  # no lock or temp file left


@pytest.mark.slow
def test_extract_under_torchrun_resumes_the_pending_rows(scenarios, extracted1):
    results, d = scenarios
    _ok(results, "extract_resume")
    _assert_same_store(extracted1, d["partial.h5"])


# -- a rank that dies ---------------------------------------------------------------------------------------


def _children_with_rank(parent: int, rank: int) -> list[int]:
    """Processes under `parent` whose environment says RANK=`rank` (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_dead_rank_takes_the_job_down_and_resume_continues(store20, env, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "cli.py",
        *_fit_args(store20.path, out, "--batch-size", "4", "--epochs", "500", "--val-decode-images", "0"),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no epoch finished in 180 s"
            time.sleep(0.05)
        (victim,) = _children_with_rank(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)  # torchrun stops rank 0 and reports: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "rank      : 1" in stderr and "SIGKILL" in stderr, stderr  # torchrun names the dead rank
    done = _load(out / "last.pt")["epoch"]
    assert 1 <= done < 500
    record = fit(TrainConfig(store=str(store20.path), out=str(out), epochs=done + 1, resume=True, device="cpu"))
    assert record["epoch"] == done + 1
    assert [m["epoch"] for m in _metrics(out)] == list(range(1, done + 2))
