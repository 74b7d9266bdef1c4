"""Captions that say what the features hold: a decoder trained by fit names what a linear classifier reads.

The features here are built to fail the way a random ResNet50's did in the demo (BENCHMARKS.md): channels whose
scales span four orders of magnitude, most of them noise, and the answer carried by a few small channels at the
object's grid cells. A linear probe reads it perfectly; a decoder that sees the raw scale (or one number for all
channels) has its inputs dominated by the large noise channels. fit's default standardises each channel with
the train split's statistics, and its captions then name the answer.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers_store import default_splits, make_store

from pipeline import checkpoint
from pipeline.decode import decode_rows
from pipeline.probe import linear_probe
from pipeline.store import FeatureStore
from pipeline.train import TrainConfig, fit

COLOURS = ("crimson", "teal", "amber", "ochre")


def _scaled_features(n: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """(n, 7, 7, 2048) features and each image's colour. Channel c has scale 10**u_c, u_c uniform in [-2, 2], and
    noise |N(0, 1)| times that. The colour adds 3 scales to 64 small channels (scale 0.1-0.4: up to a thousand
    times smaller than the largest, and above fit's floor on deviations, a tenth of the median), everywhere."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-2, 2, 2048)
    scales = 10.0**u
    small = rng.permutation(np.flatnonzero((u > -1) & (u < -0.4)))[:256].reshape(4, 64)  # each colour's channels
    feats = np.abs(rng.standard_normal((n, 7, 7, 2048))) * scales
    truth = []
    for i in range(n):
        colour = int(rng.integers(len(COLOURS)))
        feats[i][..., small[colour]] += 3 * scales[small[colour]]
        truth.append({"colour": COLOURS[colour]})
    return feats.astype(np.float32), truth


def _captions(t: dict) -> list[str]:
    return [f"a {t['colour']} thing .", f"the thing is {t['colour']} .", f"{t['colour']} thing"]


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    n = 240
    feats, truth = _scaled_features(n)
    path = tmp_path_factory.mktemp("scaled") / "features.h5"
    captions = [_captions(t) for t in truth]
    make_store(path, n, captions=captions, splits=default_splits(n), features=feats, dtype="float32")
    return path, truth


def _named(store_path, out, truth) -> dict[str, float]:
    """Share of the test images whose greedy caption names their colour."""
    ckpt = checkpoint.load(out / "model.pt")
    with FeatureStore(store_path) as store:
        model, vocab = checkpoint.build_model(ckpt, out / "model.pt", store.layer)
        rows = store.split_rows("test")
        decoded = decode_rows(model, store.features, rows, torch.device("cpu"), 1, checkpoint.max_steps(ckpt))
    words = [set(re.findall(r"[a-z]+", vocab.decode(d.tokens))) for d in decoded]  # "is ochre." names ochre
    hits = {a: [truth[r][a] in w for r, w in zip(rows, words, strict=True)] for a in ("colour",)}
    return {a: float(np.mean(h)) for a, h in hits.items()}


def _fit(store_path, out, **kw) -> None:
    fit(
        TrainConfig(
            store=str(store_path), out=str(out), epochs=12, batch_size=8, lr=1e-2, device="cpu", min_word_count=1,
            captions_per_image=3, val_decode_images=0, decoder="tiny", **kw,
        )
    )  # fmt: skip


@pytest.mark.slow  # two fits of 12 epochs: ~30 s on 2 cores
def test_captions_name_what_a_linear_probe_reads_from_badly_scaled_features(scaled, tmp_path):
    path, truth = scaled
    with FeatureStore(path) as store:
        labels = {a: [t[a] for t in truth] for a in ("colour",)}
        splits = [store.split_rows(s) for s in ("train", "val", "test")]
        probe = {r.attribute: r.accuracy for r in linear_probe(store.features, labels, *splits, pools=("grid",))}
    assert probe == {"colour": 1.0}  # the answer is linearly readable

    _fit(path, tmp_path / "channel")  # the default: each channel standardised
    named = _named(path, tmp_path / "channel", truth)
    assert all(named[a] >= probe[a] - 0.05 for a in probe), (named, probe)

    # the cause, shown: the same run with all channels scaled by one number (the default before) misses the colour
    _fit(path, tmp_path / "rms", feature_norm="rms")
    assert _named(path, tmp_path / "rms", truth)["colour"] < 0.7


def _placed_features(n: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """(n, 7, 7, 2048) noise with one object: the same vector in every image, added to one of three cells of the
    second row or of the sixth. Where it is (the label) is in which cell holds it, and in nothing else: any
    weighted mean of the cells (what an attention step reads) is the same wherever the object is."""
    rng = np.random.default_rng(seed)
    thing = 2.0 + rng.random(2048)
    feats = np.abs(rng.standard_normal((n, 7, 7, 2048)))
    truth = []
    for i in range(n):
        where = ("up", "down")[int(rng.integers(2))]
        feats[i, 1 if where == "up" else 5, 1 + 2 * int(rng.integers(3))] += thing
        truth.append({"colour": where})  # `_named` reads the attribute "colour"
    return feats.astype(np.float32), truth


@pytest.mark.slow  # two fits of 12 epochs: ~30 s on 2 cores
def test_captions_name_where_the_object_is_from_the_state_from_the_grid(tmp_path):
    """fit's default reads the whole grid once per image (`--init-from-grid`): the captions name what only the
    arrangement of the cells says. The report's decoder (`--init-from-grid 0`), which sees the image only through
    weighted means of the cells, cannot: it names it at chance."""
    n = 240
    feats, truth = _placed_features(n)
    path = tmp_path / "features.h5"
    captions = [[f"the thing is {t['colour']} .", f"a thing {t['colour']}", f"{t['colour']} thing"] for t in truth]
    make_store(path, n, captions=captions, splits=default_splits(n), features=feats, dtype="float32")

    _fit(path, tmp_path / "grid")
    assert _named(path, tmp_path / "grid", truth)["colour"] >= 0.9

    _fit(path, tmp_path / "report", init_from_grid=0)
    assert _named(path, tmp_path / "report", truth)["colour"] <= 0.75
