"""pipeline.probe: the linear classifier the captions are held to, on the whole grid, the mean of the cells and
one weighted mean of them (a glimpse)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.probe import linear_probe


def _features(n: int = 120, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(n, 3, 3, 16) noise with each image's label written into the channels of one cell, a different cell per
    image (given as the image's cell weights), and drowned in the mean by the other eight cells' noise."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, 3, 3, 16)).astype(np.float32) * 3
    labels, weights = [], np.zeros((n, 9))
    for i in range(n):
        label, cell = int(rng.integers(2)), int(rng.integers(9))
        feats[i].reshape(9, 16)[cell, :8] += 4.0 if label else -4.0
        labels.append(f"class{label}")
        weights[i, cell] = 1.0
    return feats, labels, weights


def test_a_glimpse_at_the_right_cell_reads_what_the_mean_of_the_cells_drowns():
    feats, labels, weights = _features()
    rows = np.arange(len(labels))
    found = linear_probe(feats, {"label": labels}, rows[:80], rows[80:100], rows[100:], ("mean", "glimpse"), weights)
    accuracy = {r.pool: r.accuracy for r in found}
    assert accuracy["glimpse"] == 1.0 and accuracy["mean"] < 0.9, accuracy
    with pytest.raises(ValueError, match="weights"):
        linear_probe(feats, {"label": labels}, rows[:80], rows[80:100], rows[100:], ("glimpse",))
