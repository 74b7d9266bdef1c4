"""Attention figures: the photo, then one panel per generated word with its 7x7 attention upsampled."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


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
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=255)
        ax.set_title(word, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
