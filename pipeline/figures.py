"""Attention figures: the photo, then one panel per generated word with its 7x7 attention upsampled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

# How attention is drawn over the photo, here and on the `serve` page (which gets the colours from the server).
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, path: Path, size: int = 224) -> Path:
    """Write a PNG with 1 + len(words) panels; alphas (len(words), 49). Uses matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    photo = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    grid = int(round(math.sqrt(alphas.shape[-1]))) if len(words) else 7
    panels = 1 + len(words)
    cols = min(panels, 5)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(photo)
    axes.flat[0].set_title("photo", fontsize=10)
    for i, word in enumerate(words):
        ax = axes.flat[i + 1]
        heat = alphas[i].reshape(grid, grid)
        heat = np.asarray(
            Image.fromarray((heat / max(heat.max(), 1e-12) * 255).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        ax.imshow(photo)
        ax.imshow(heat, cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=255)
        ax.set_title(word, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def colormap_table(n: int = 256) -> list[list[int]]:
    """COLORMAP as n RGB triples (0-255). With n = 256, entry i is the colour attention_figure gives a heat
    value of i (its heat maps are uint8, drawn with vmin 0 and vmax 255)."""
    import matplotlib

    rgba = matplotlib.colormaps[COLORMAP].resampled(n)(np.arange(n))
    return (np.asarray(rgba)[:, :3] * 255).round().astype(int).tolist()
