"""The demo's pictures: one shape (circle, square, triangle) of one colour in one place, on a textured
background, drawn with Pillow, with five captions that say what and where (`make_dataset`), and where the
object is (`object_mask`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.files import write_text_atomic

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
TEMPLATES = (
    "a {c} {s} {p} .",
    "there is a {c} {s} {p} of the picture .",
    "a {s} that is {c} , {p} .",
    "the {c} {s} is {p} .",
    "one {c} {s} {p} of the image .",
)


def draw_sample(rng: random.Random, size: int) -> tuple[Image.Image, str, str, str]:
    img, attrs = draw_object_sample(rng, size)
    return img, attrs["colour"], attrs["shape"], attrs["place"]


def draw_object_sample(rng: random.Random, size: int) -> tuple[Image.Image, dict]:
    """One picture and its attributes: colour, shape, place, and `object` (centre cx, cy and radius r in
    pixels of the `size` x `size` picture), from which `object_mask` redraws where the object is."""
    colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
    base = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    for _ in range(6):  # faint clutter so that the task is not a single pixel lookup
        x, y = rng.randrange(size), rng.randrange(size)
        r = rng.randint(2, 6)
        grey = rng.randint(150, 200)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(grey, grey, grey))
    cx, cy = PLACES[place]
    jitter = size * 0.06
    cx, cy = cx * size + rng.uniform(-jitter, jitter), cy * size + rng.uniform(-jitter, jitter)
    r = size * rng.uniform(0.19, 0.24)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    _draw_object(d, shape, cx, cy, r, fill)
    return img, {"colour": colour, "shape": shape, "place": place, "object": {"cx": cx, "cy": cy, "r": r}}


def _draw_object(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.9), (cx + r, cy + r * 0.9)], fill=fill)


def object_mask(attrs: dict, size: int, grid: int = 7) -> np.ndarray:
    """(grid * grid,) share of each attention cell that the object covers (row-major, as the decoder's 49
    positions): the object redrawn alone, averaged over each cell's window. The transform's resize to 224x224
    scales the square picture uniformly; the encoder's cell (i, j) is centred on pixel (j, i) x size / grid
    (ResNet50's strided convolutions pad symmetrically: figures.heat_map), so its window is the grid's tiling
    moved half a cell up and left. (Measured on the picture's own tiling, the attention of the README's
    figures sat half a cell low and right of the object, and the ratios came out 1.3-2.3x too low.)"""
    mask = Image.new("L", (size, size), 0)
    o = attrs["object"]
    _draw_object(ImageDraw.Draw(mask), attrs["shape"], o["cx"], o["cy"], o["r"], 255)
    half = round(size / grid / 2)
    moved = Image.new("L", (size, size), 0)
    moved.paste(mask, (half, half))  # the window of cell j starts half a cell before j x size / grid
    return np.asarray(moved.resize((grid, grid), Image.Resampling.BOX), dtype=np.float64).ravel() / 255.0


def make_dataset(folder: Path, n: int, size: int = 224, seed: int = 0) -> Path:
    """Write n JPEGs and a Karpathy-layout captions file (80/10/10 split); returns the captions file."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, rel in enumerate(image_names(n)):
        img, attributes = draw_object_sample(rng, size)
        colour, shape, place = attributes["colour"], attributes["shape"], attributes["place"]
        name = Path(rel).name
        img.save(folder / rel, quality=92)
        split = "train" if i < n * 0.8 else "val" if i < n * 0.9 else "test"
        sentences = [{"raw": t.format(c=colour, s=shape, p=PHRASES[place])} for t in TEMPLATES]
        entries.append(
            {
                "filepath": "images",
                "filename": name,
                "split": split,
                "sentences": sentences,
                "attributes": attributes | {"size": size},
            }
        )
    path = folder / "demo_captions.json"
    write_text_atomic(path, json.dumps({"dataset": "demo", "images": entries}))
    return path


def image_names(n: int) -> list[str]:
    """The images `make_dataset(folder, n)` draws, relative to `folder`."""
    return [f"images/shape_{i:05d}.jpg" for i in range(n)]
