"""`generate`: caption photos with a trained model, optionally with attention figures.

`generate` is a generator: it yields each caption as soon as it is made, and the caller prints it
(`cli.py`) or returns it (a web page).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.captioner import Captioner
from pipeline.config import GenerateConfig
from pipeline.console import warn
from pipeline.datasets import IMAGE_SUFFIXES
from pipeline.errors import UserError, describe
from pipeline.figures import attention_figure
from pipeline.runtime import resolve_device
from pipeline.transform import DECODE_ERRORS, open_image, resize_uint8

__all__ = ["GenerateConfig", "generate", "expand_images"]


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the image files directly inside them (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                warn(f"no image files in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


def figure_path(base: Path, image: Path, index: int, many: bool, used: set[Path]) -> Path:
    """FILE.png for one image; FILE_<image stem>.png for each of several (numbered on a clash)."""
    if not many:
        return base
    path = base.with_name(f"{base.stem}_{image.stem}{base.suffix or '.png'}")
    if path in used:
        path = base.with_name(f"{base.stem}_{image.stem}_{index}{base.suffix or '.png'}")
    used.add(path)
    return path


def generate(cfg: GenerateConfig) -> Iterator[dict]:
    """Caption every image, yielding {"image": PATH, "caption": TEXT} (and "attention": FIGURE with
    `cfg.attention`) per image, in order. One bad image among several is reported and skipped; a single
    bad image, or none readable, is a UserError."""
    if not cfg.images:
        raise UserError("give at least one --image (a file or a folder)")
    if cfg.beam_size < 1:
        raise UserError("--beam-size must be at least 1")
    paths = expand_images(cfg.images)
    if not paths:
        raise UserError("no images to caption")
    single = len(paths) == 1
    if single and not paths[0].is_file():
        raise UserError(f"image not found: {paths[0]}")
    device = resolve_device(cfg.device)
    captioner = Captioner.load(cfg.model, device)
    captioned, failed, used = 0, [], set()
    for start in range(0, len(paths), cfg.batch_size):
        opened = []
        for p in paths[start : start + cfg.batch_size]:
            try:
                opened.append((p, open_image(p, captioner.transform)))
            except (*DECODE_ERRORS, FileNotFoundError) as e:
                if single:
                    raise UserError(f"cannot read image {p}: {describe(e)}") from None
                warn(f"skipped {p}: {describe(e)}")
                failed.append(p)
        if not opened:
            continue
        pixels = torch.stack([resize_uint8(img, captioner.transform) for _, img in opened])
        for (p, img), d in zip(opened, captioner.caption(pixels, cfg.beam_size), strict=True):
            item = {"image": str(p), "caption": captioner.vocab.decode(d.tokens)}
            if cfg.attention is not None:
                fig = figure_path(cfg.attention, p, start + captioned, not single, used)
                item["attention"] = str(attention_figure(img, captioner.words(d), d.attention, fig))
            captioned += 1
            yield item
    if failed:
        warn(f"{len(failed)} of {len(paths)} images could not be read; {captioned} captioned")
    if not captioned:
        raise UserError("none of the images could be read")
