"""A second captioned picture set, unlike the demo's: other shapes, colours, places, backgrounds and sentence
templates. It checks that what fit learns on the demo is not tuned to the demo's generator: section `quality`
(benchmarks/bench_quality.py) trains on it as the demo trains, and compares its captions with the linear probe.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"purple": (130, 40, 170), "orange": (245, 130, 20), "cyan": (20, 200, 210), "black": (20, 20, 20)}
SHAPES = ("star", "cross", "ring", "diamond")
PLACES = {"upper-left": (0.3, 0.3), "upper-right": (0.7, 0.3), "lower-left": (0.3, 0.7), "lower-right": (0.7, 0.7),
          "centre": (0.5, 0.5)}  # fmt: skip
WORDS = {"upper-left": "in the upper left", "upper-right": "in the upper right", "lower-left": "in the lower left",
         "lower-right": "in the lower right", "centre": "in the centre"}  # fmt: skip
TEMPLATES = (
    "{c} {s} {p}",
    "a picture of a {c} {s} {p} .",
    "{p} there is one {s} , coloured {c} .",
    "a {s} drawn in {c} {p} .",
    "we see a {c} {s} sitting {p} .",
)


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "star":
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
        angles = [math.pi / 5 * k - math.pi / 2 for k in range(10)]
        pts = [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles, strict=True)]
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.3)))
    else:
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)


def make_hidden_set(folder: Path, n: int, size: int = 224, seed: int = 7) -> tuple[Path, dict[str, dict]]:
    """n JPEGs under folder/pics and a Karpathy-layout captions file (80/10/10); returns it and each image's
    attributes by its store name."""
    rng = random.Random(seed)
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    entries, truth = [], {}
    for i in range(n):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        img = Image.new("RGB", (size, size), tuple(rng.randint(150, 200) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for y in range(0, size, 16):  # stripes: a background unlike the demo's speckles
            d.line((0, y + rng.randint(0, 6), size, y), fill=tuple(rng.randint(120, 210) for _ in range(3)), width=2)
        px, py = PLACES[place]
        cx, cy = (px + rng.uniform(-0.05, 0.05)) * size, (py + rng.uniform(-0.05, 0.05)) * size
        _draw(d, shape, cx, cy, size * rng.uniform(0.15, 0.2), COLOURS[colour])
        name = f"pic{i:04d}.jpg"
        img.save(folder / "pics" / name, quality=90)
        split = "train" if i < n * 0.8 else "val" if i < n * 0.9 else "test"
        texts = [t.format(c=colour, s=shape, p=WORDS[place]) for t in TEMPLATES]
        entries.append({"filepath": "pics", "filename": name, "split": split, "sentences": [{"raw": t} for t in texts]})
        truth[f"pics/{name}"] = {"colour": colour, "shape": shape, "place": place}
    path = folder / "hidden_captions.json"
    path.write_text(json.dumps({"dataset": "hidden", "images": entries}), encoding="utf-8")
    return path, truth


def attribute_accuracy(captions: list[dict], truth: dict[str, dict]) -> dict[str, float]:
    """Share of the generated captions (evaluate's) that name each image's colour, shape and place phrase."""

    def says(caption: str, attribute: str, value: str) -> bool:
        text = " ".join(re.findall(r"[a-z]+", caption))
        return f" {WORDS[value] if attribute == 'place' else value} " in f" {text} "

    return {
        a: sum(says(c["caption"], a, truth[c["image"]][a]) for c in captions) / max(len(captions), 1)
        for a in ("colour", "shape", "place")
    }
