"""Self-critical sequence training (`fit --scst-after N`, pipeline/scst.py): the sampler, the rewards and the
baselines, a run that raises validation CIDEr-D over its cross-entropy start, exact resume, and the refusals.

Tiny decoder, synthetic stores (tests/helpers_store.py), CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from assertions import assert_same
from helpers_store import make_store

from pipeline.model import Decoder, DecoderConfig
from pipeline.scst import Samples, collapsing, mean_baseline, reward_loss, sample
from pipeline.train import TrainConfig, fit, prepare
from pipeline.vocab import END_ID, PAD_ID, START_ID


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "store": str(store),
        "out": str(out),
        "epochs": 4,
        "batch_size": 7,
        "lr": 1e-2,
        "device": "cpu",
        "min_word_count": 1,
        "val_decode_images": 3,
        "decoder": "tiny",
        "scst_after": 2,
    }
    return TrainConfig(**(base | kw))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def store20(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.h5", n_images=20)


# -- the sampler ----------------------------------------------------------------------------------------


def _replayed_log_probs(decoder: Decoder, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of `tokens` (B, K, T) fed back through the step API, renormalised without <pad>/<start>."""
    state = decoder.init_state(features, groups=tokens.shape[1])
    word = torch.full(tokens.shape[:2], START_ID, dtype=torch.long)
    out = []
    for t in range(tokens.shape[-1]):
        logits, state, _ = decoder.step(state, word)
        logits[..., [PAD_ID, START_ID]] = -float("inf")
        out.append(logits.log_softmax(-1).gather(-1, tokens[..., t : t + 1].clamp(min=0)).squeeze(-1))
        word = tokens[..., t]
    return torch.stack(out, -1)


def test_sampler_respects_end_and_groups_and_matches_the_step_api():
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.preset("tiny", vocab_size=9)).eval()
    with torch.no_grad():  # <end> likely enough that most samples end before max_steps
        decoder.fc_out.bias[END_ID] = 2.0
    features = torch.randn(3, 7, 7, 2048)
    drawn = sample(decoder, features, k=4, max_steps=12)
    b, k, t = drawn.tokens.shape
    assert (b, k) == (3, 4) and t <= 12
    assert drawn.log_probs.shape == drawn.mask.shape == drawn.tokens.shape
    ended = 0
    rows = zip(drawn.tokens.reshape(-1, t), drawn.mask.reshape(-1, t), drawn.log_probs.reshape(-1, t), strict=True)
    for seq, mask, logp in rows:
        ends = (seq == END_ID).nonzero().flatten().tolist()
        n = ends[0] + 1 if ends else t  # the sampled tokens, <end> included
        ended += bool(ends)
        assert mask.tolist() == [True] * n + [False] * (t - n)
        assert (seq[n:] == PAD_ID).all() and (logp[n:] == 0).all()
        assert not ({PAD_ID, START_ID} & set(seq[:n].tolist()))
        assert (logp[:n] < 0).all()
    assert ended >= 6  # most of the 12 ended
    assert len({tuple(s) for s in drawn.tokens.reshape(-1, t).tolist()}) > 3  # the samples differ
    # each image's K samples are scored by its own features (one image at a time = the batch)
    for i in range(b):
        alone = _replayed_log_probs(decoder, features[i : i + 1], drawn.tokens[i : i + 1])
        torch.testing.assert_close(alone[drawn.mask[i : i + 1]], drawn.log_probs[i : i + 1][drawn.mask[i : i + 1]])


def test_sampler_log_probs_carry_the_gradient():
    torch.manual_seed(1)
    decoder = Decoder(DecoderConfig.preset("tiny", vocab_size=9))
    drawn = sample(decoder, torch.randn(2, 7, 7, 2048), k=3, max_steps=5)
    reward_loss(drawn, torch.ones(2, 3)).backward()
    assert decoder.fc_out.weight.grad is not None and decoder.gates.weight.grad.abs().sum() > 0


def test_mean_baseline_and_reward_loss():
    rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(mean_baseline(rewards), [[2.5, 2.0, 1.5], [1.5, 1.5, 0.0]])
    logp = torch.tensor([[[-1.0, -2.0, 0.0]], [[-0.5, 0.0, 0.0]]])  # (B=2, K=1, T=3)
    mask = torch.tensor([[[True, True, False]], [[True, False, False]]])
    loss = reward_loss(Samples(torch.zeros_like(logp, dtype=torch.long), logp, mask), torch.tensor([[2.0], [-1.0]]))
    assert float(loss) == pytest.approx(-(2.0 * -3.0 + -1.0 * -0.5) / 3)  # mean over the 3 sampled tokens


def test_rewards_score_ids_against_the_train_captions(store20):
    from pipeline.scst import Rewards

    data = prepare(_cfg(store20.path, Path("unused")))
    rewards = Rewards(data.vocab, data.captions, data.train_rows)
    row = int(data.train_rows[0])
    own = data.vocab.encode(store20.captions[row][0])[1:]  # words and <end>
    other = data.vocab.encode(store20.captions[int(data.train_rows[1])][0])[1:]  # another class
    tokens = np.full((1, 3, 12), PAD_ID)
    tokens[0, 0, : len(own)] = own
    tokens[0, 1, : len(other)] = other
    tokens[0, 2, 0] = END_ID  # the empty caption
    got = rewards(np.array([row]), tokens)
    assert got[0, 0] > 1.0 and got[0, 1] < got[0, 0] and got[0, 2] == 0.0


def test_collapse_is_three_falls_in_a_row():
    scst = [{"phase": "scst", "reward": r} for r in (0.5, 0.9, 0.8, 0.7)]
    assert not collapsing(scst[:3]) and not collapsing([{"phase": "xe"}, *scst[1:]])
    assert collapsing([*scst, {"phase": "scst", "reward": 0.6}])
    assert not collapsing([*scst, {"phase": "scst", "reward": 0.75}])


# -- fit ------------------------------------------------------------------------------------------------


def test_scst_raises_validation_cider_over_its_cross_entropy_start(tmp_path):
    """5 cross-entropy epochs (a weak start: the captions repeat a word) then 3 SCST epochs on CIDEr-D."""
    store = make_store(tmp_path / "s40.h5", n_images=40)
    out = tmp_path / "out"
    fit(_cfg(store.path, out, epochs=8, scst_after=5, val_decode_images=1000))
    metrics = _metrics(out)
    assert [m["phase"] for m in metrics] == ["xe"] * 5 + ["scst"] * 3
    start = metrics[4]["val_cider_d"]
    best = max(m["val_cider_d"] for m in metrics[5:])
    assert best > start + 0.3, [m["val_cider_d"] for m in metrics]
    for m in metrics[5:]:
        assert m["reward"] > 0 and m["baseline"] == pytest.approx(m["reward"])  # mean baseline: same mean
        assert np.isfinite(m["train_loss"]) and m["samples_per_second"] > 0
    assert _load(out / "model.pt")["epoch"] == _load(out / "last.pt")["best"]["epoch"] > 5


def test_resume_in_the_scst_phase_is_exact(store20, tmp_path, baseline="mean"):
    """--epochs 4 --scst-after 2 == --epochs 3 --scst-after 2, then --resume --epochs 4 (the schedule from
    last.pt when not given again)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    fit(_cfg(store20.path, whole, dropout=0.3, scst_baseline=baseline))
    fit(_cfg(store20.path, split, epochs=3, dropout=0.3, scst_baseline=baseline))
    fit(_cfg(store20.path, split, resume=True, scst_after=None))
    a, b = _load(whole / "last.pt"), _load(split / "last.pt")
    for key in ("model", "optimizer", "scheduler", "best", "rng", "epoch"):
        assert_same(a[key], b[key], key)
    assert_same(_load(whole / "model.pt")["model"], _load(split / "model.pt")["model"])
    ma, mb = _metrics(whole), _metrics(split)
    assert [m["phase"] for m in mb] == ["xe", "xe", "scst", "scst"]
    for x, y in zip(ma, mb, strict=True):
        for key in ("train_loss", "val_loss", "val_cider_d", "sample", "phase", "reward", "baseline"):
            assert x.get(key) == y.get(key), (key, x["epoch"])


def test_a_finished_cross_entropy_run_continues_with_scst(store20, tmp_path):
    out = tmp_path / "out"
    fit(_cfg(store20.path, out, epochs=2, scst_after=None))
    assert _load(out / "last.pt")["train_config"]["scst_after"] is None
    fit(_cfg(store20.path, out, epochs=3, scst_after=2, resume=True))
    metrics = _metrics(out)
    assert [m["phase"] for m in metrics] == ["xe", "xe", "scst"] and metrics[-1]["reward"] >= 0
    assert _load(out / "last.pt")["train_config"]["scst_after"] == 2


# -- refusals and reports (through the CLI) ------------------------------------------------------------


def _fit_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--decoder", "tiny", "--store", str(store), "--out", str(out), "--device", "cpu",
        "--batch-size", "7", "--lr", "0.01", "--min-word-count", "1", "--val-decode-images", "3", *extra,
    ]  # fmt: skip


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_scst_without_cross_entropy_first_is_refused(store20, tmp_path, cli):
    out = tmp_path / "out"
    line = _error_line(cli(*_fit_args(store20.path, out, "--epochs", "3", "--scst-after", "0"), code=1))
    assert "--scst-after 0" in line and "no cross-entropy" in line and "no signal" in line
    assert not out.exists()
    cli(*_fit_args(store20.path, out, "--scst-baseline", "best"), code=2)  # not a choice: a usage error


def test_progress_and_epoch_lines_show_reward_and_baseline(store20, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(*_fit_args(store20.path, out, "--epochs", "2", "--scst-after", "1", "--scst-baseline", "greedy"))
    line = next(x for x in result.stdout.splitlines() if x.startswith("epoch 2:"))
    assert "scst reward" in line and "baseline" in line
    assert "reward=" in result.stdout and "baseline=" in result.stdout  # the progress line (not a TTY)
    assert [m["phase"] for m in _metrics(out)] == ["xe", "scst"]


def test_a_falling_reward_is_reported_and_model_pt_stays_chosen_by_cider(store20, tmp_path, cli, monkeypatch):
    """Rewards falling for 3 SCST epochs in a row: a warning naming the epoch model.pt holds (stubbed epochs)."""
    import pipeline.train.recipe

    rewards = iter([0.9, 0.8, 0.7, 0.6])

    def falling(module, optimizer, batches, epoch, cfg, dist=None) -> dict:
        reward = next(rewards)
        return {"phase": "scst", "train_loss": 0.0, "reward": reward, "baseline": reward, "seconds": 1.0,
                "samples_per_second": 1.0}  # fmt: skip

    monkeypatch.setattr(pipeline.train.recipe, "scst_epoch", falling)
    out = tmp_path / "out"
    result = cli(*_fit_args(store20.path, out, "--epochs", "5", "--scst-after", "1"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "fell 3 epochs in a row (0.900 > 0.800 > 0.700 > 0.600)" in warnings[0]
    best = _load(out / "last.pt")["best"]["epoch"]
    assert f"model.pt stays the epoch with the best validation score (epoch {best}," in warnings[0]
    assert _load(out / "model.pt")["epoch"] == best
