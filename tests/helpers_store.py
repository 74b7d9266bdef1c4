"""Tiny feature stores for the fit tests, built without running ResNet50.

Each image gets a class c in 0..3. Its features are small random noise plus a strong signal tied to c
(channels c*16 .. c*16+15 set to 3.0 at every grid position), and its captions name the class's colour and
shape, so a decoder can learn to caption these "images" in a few CPU epochs. `layer="layer3"` makes a layer3
store (14x14x1024 rows, the same signal) for fit's layer4 path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests import `pipeline` from the repository root
    sys.path.insert(0, str(ROOT))

import pipeline.store as feature_store  # noqa: E402
from pipeline.datasets import CaptionSet  # noqa: E402
from pipeline.encoder import FEATURE_SHAPES, WeightsInfo  # noqa: E402
from pipeline.transform import TransformConfig  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle", "star")
TEMPLATES = (  # short: training cost grows with caption length
    "a {colour} {shape} .",
    "The {shape} is {colour}.",
    "one {colour} {shape}",
    "a {colour} {shape} here",
    "{colour} {shape} .",
)
N_CLASSES = len(COLOURS)
SIGNAL_WIDTH = 16
SIGNAL = 3.0
DTYPES = feature_store.DTYPES


def class_captions(c: int) -> list[str]:
    """The five captions of an image of class c (they name only its colour and shape)."""
    return [t.format(colour=COLOURS[c], shape=SHAPES[c]) for t in TEMPLATES]


def default_splits(n: int) -> list[str]:
    """~70% train, 15% val, 15% test, interleaved so that every split holds every class."""
    pattern = ["train"] * 14 + ["val"] * 3 + ["test"] * 3  # 20 images: 70 / 15 / 15
    return [pattern[(i * 7) % 20] for i in range(n)]  # 7 is coprime with 20: a permutation per 20 rows


@dataclass
class SyntheticStore:
    path: Path
    classes: np.ndarray  # (N,) class of each row
    captions: list[list[str]]
    splits: list[str]
    features: np.ndarray  # (N, 7, 7, 2048) or (N, 14, 14, 1024): what was written (in the store dtype)


def make_features(classes: np.ndarray, seed: int = 0, dtype: str = "float16", layer: str = "layer4") -> np.ndarray:
    rng = np.random.default_rng(seed)
    feats = np.abs(rng.standard_normal((len(classes), *FEATURE_SHAPES[layer]), dtype=np.float32)) * 0.5
    for i, c in enumerate(classes):
        feats[i, :, :, c * SIGNAL_WIDTH : (c + 1) * SIGNAL_WIDTH] = SIGNAL
    return feats.astype(feature_store.DTYPES[dtype])


def make_store(
    path: str | Path,
    n_images: int = 40,
    captions: list[list[str]] | None = None,
    splits: list[str] | None = None,
    seed: int = 0,
    dtype: str = "float16",
    weights: WeightsInfo | None = None,
    finish: bool = True,
    layer: str = "layer4",
    features: np.ndarray | None = None,
) -> SyntheticStore:
    """Create a complete store at `path` (all rows written) without any encoder.

    `captions` and `splits` (one entry per image) replace the generated ones; with `finish=False` only
    the first half of the rows is written and the store stays incomplete, as after an interrupted extract.
    `features` (one row per image) replace the generated ones.
    """
    path = Path(path)
    classes = np.arange(n_images) % N_CLASSES
    if captions is None:
        captions = [class_captions(int(c)) for c in classes]
    if splits is None:
        splits = default_splits(n_images)
    assert len(captions) == len(splits) == n_images
    caption_set = CaptionSet(
        images=[f"img{i}.jpg" for i in range(n_images)],
        captions=[list(c) for c in captions],
        splits=list(splits),
        layout="test",
        source=Path("synthetic"),
    )
    from pipeline.extract import provenance  # imports torchvision (seconds): only when a store is made

    prov = provenance((weights or WeightsInfo("none", "")).to_dict(), TransformConfig(), dtype, layer)
    feature_store.create(path, caption_set, prov)
    feats = make_features(classes, seed, dtype, layer) if features is None else features.astype(DTYPES[dtype])
    writer = feature_store.Writer(path)
    try:
        rows = np.arange(n_images) if finish else np.arange(n_images // 2)
        writer.write(rows, feats[rows], feature_store.WRITTEN)
        if finish:
            writer.finish()
    finally:
        writer.close()
    return SyntheticStore(path, classes, caption_set.captions, caption_set.splits, feats)
