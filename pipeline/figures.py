"""Figures, drawn with matplotlib's Agg backend (no display needed) and written atomically:

- attention: the photo, then one panel per generated word with its 7x7 attention upsampled;
- training curves: fit's `OUT/curves.png`, redrawn from metrics.jsonl's records after each epoch.

Each PNG carries its writer's mark (its `Software` text chunk), by which `is_own_figure` tells a figure that
writer made, and may replace, from any other file: generate's attention figures and fit's curves carry
different marks, so neither takes the other's file for its own.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_write

# How attention is drawn over the photo, here and on the `serve` page (which gets the colours from the server).
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One mark per writer. (Figures written before the marks were split carry "captioner (attention-LSTM image
# captioning)", which both wrote: such a file is nobody's own any more, and is never replaced.)
MARKS = {
    "attention": "captioner generate (attention figure)",
    "curves": "captioner fit (training curves)",
}


def _save(fig, path: Path, dpi: int, kind: str) -> Path:
    """PNG at `path`, atomically (a figure is never seen half-written), with the mark of its `kind`."""
    plt = _pyplot()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=dpi, metadata={"Software": MARKS[kind]})
    finally:
        plt.close(fig)
    return path


def is_own_figure(path: Path, kind: str = "attention") -> bool:
    """Whether `path` is a regular file holding a PNG of this `kind` that this tool wrote (it carries that
    kind's mark)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == MARKS[kind]
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image at all
        return False


def heat_map(alpha: np.ndarray, size: int = 224) -> np.ndarray:
    """One word's attention (grid x grid weights) as a (size, size) uint8 map over the photo: the weights over
    their maximum in uint8, interpolated bilinearly with the grid's cells where the encoder's are. ResNet50's
    strided convolutions pad symmetrically, so its cell (i, j) is centred on pixel (j, i) x 32 of the 224x224
    input (pixel 96 for the middle cell, measured in tests/core/test_geometry.py), half a cell up and left of
    the picture's 7x7 tiling; drawn on that tiling the heat sat half a cell low and right. Pixel x reads the
    grid at x * grid / size, clamped at the edges. serve's page (web/app.js `draw`) computes the same map."""
    n = int(round(math.sqrt(alpha.size)))
    heat = (alpha.reshape(n, n) / max(float(alpha.max()), 1e-12) * 255).astype(np.uint8).astype(np.float64)
    s = np.clip(np.arange(size) * n / size, 0, n - 1)
    lo = np.floor(s).astype(int)
    hi, f = np.minimum(lo + 1, n - 1), s - lo
    cols = heat[:, lo] * (1 - f) + heat[:, hi] * f  # (n, size): along x first, as the page does
    out = cols[lo] * (1 - f)[:, None] + cols[hi] * f[:, None]
    return np.floor(out + 0.5).astype(np.uint8)  # rounded half up, as JavaScript's Math.round


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, path: Path, size: int = 224) -> Path:
    """Write a PNG with 1 + len(words) panels; alphas (len(words), 49)."""
    plt = _pyplot()
    photo = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
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
        heat = heat_map(alphas[i], size)
        ax.imshow(photo)
        ax.imshow(heat, cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=255)
        ax.set_title(word, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, dpi=80, kind="attention")


def training_curves(records: list[dict], path: Path) -> Path:
    """fit's curves from metrics.jsonl's records: train and validation loss, validation CIDEr-D (when
    decoded), and training samples/s, one point per epoch."""
    plt = _pyplot()

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        points = [(e, v) for e, v in points if math.isfinite(v)]
        return [e for e, _ in points], [v for _, v in points]

    fig, (loss_ax, cider_ax, speed_ax) = plt.subplots(1, 3, figsize=(11, 3.2))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(*series(key), marker=".", label=label)
    loss_ax.set(title="loss (masked cross-entropy)", xlabel="epoch")
    loss_ax.legend()
    cider_ax.plot(*series("val_cider_d"), marker=".", color="tab:green")
    cider_ax.set(title="validation CIDEr-D", xlabel="epoch")
    decoded = bool(series("val_cider_d")[0])
    if not decoded:  # an empty panel that says why, without the axes of an empty plot
        cider_ax.set(xticks=[], yticks=[])
        cider_ax.text(
            0.5,
            0.5,
            "not decoded\n(--val-decode-images 0)",
            ha="center",
            va="center",
            transform=cider_ax.transAxes,
            color="grey",
        )
    epochs, speed = series("samples_per_second")
    speed_ax.plot(epochs, speed, marker=".", color="tab:purple")
    speed_ax.set(title="training samples/s", xlabel="epoch")
    speed_ax.set_ylim(0, 1.15 * max(speed, default=1.0))
    for ax in (loss_ax, cider_ax, speed_ax) if decoded else (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _save(fig, path, dpi=80, kind="curves")


def colormap_table(n: int = 256) -> list[list[int]]:
    """COLORMAP as n RGB triples (0-255). With n = 256, entry i is the colour attention_figure gives a heat
    value of i (its heat maps are uint8, drawn with vmin 0 and vmax 255)."""
    import matplotlib

    rgba = matplotlib.colormaps[COLORMAP].resampled(n)(np.arange(n))
    return (np.asarray(rgba)[:, :3] * 255).round().astype(int).tolist()
