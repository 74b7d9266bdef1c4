"""`generate`: caption photos with a trained model, optionally with attention figures.

`generate` is a generator: it yields each caption as soon as it is made, and the caller prints it
(`cli.py`) or returns it (a web page). The figures' paths are worked out and checked before the models are
loaded: generate replaces no file but a figure it wrote itself.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.captioner import Captioner
from pipeline.config import MAX_BEAM_SIZE, GenerateConfig
from pipeline.datasets import IMAGE_SUFFIXES
from pipeline.errors import UserError, describe
from pipeline.figures import attention_figure, is_own_figure
from pipeline.files import check_writable_folder, remove_stale_temps
from pipeline.runtime import resolve_device
from pipeline.transform import DECODE_ERRORS, open_image, resize_uint8

log = logging.getLogger(__name__)

__all__ = ["GenerateConfig", "generate", "expand_images", "figure_paths"]


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the image files directly inside them (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                log.warning(f"no image files in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


def figure_paths(attention: str | Path, images: list[Path]) -> list[Path]:
    """Where each image's attention figure goes, checked before any work:

    - a folder (one that exists, or a path ending in /): FOLDER/<image stem>.png for each image;
    - FILE.png: that file for one image, FILE_<image stem>.png for each of several.

    Names that clash (compared in NFC and ignoring case, as some file systems do) get the image's position
    appended, then a counter, until no two images share a figure; generate prints each image's figure with its
    caption. A path that exists must be a figure generate wrote (a PNG that carries its mark): anything else
    is refused, never replaced."""
    text = str(attention)
    base = Path(attention)
    folder = base.is_dir() or text.endswith(("/", os.sep))
    if not folder and base.suffix.lower() != ".png":
        raise UserError(
            f"--attention {text}: give a .png file name, or a folder (an existing one, or a path ending in /)"
        )
    check_writable_folder(base if folder else base.parent, "the folder of --attention")
    out: list[Path] = []
    taken: set[str] = set()
    for i, image in enumerate(images):
        if folder:
            path = base / f"{image.stem}.png"
        elif len(images) == 1:
            path = base
        else:
            path = base.with_name(f"{base.stem}_{image.stem}{base.suffix}")
        first, n = path, 0
        while _key(path) in taken:
            n += 1
            path = first.with_name(f"{first.stem}_{i}{f'_{n}' if n > 1 else ''}{first.suffix}")
        taken.add(_key(path))
        if (path.exists() or path.is_symlink()) and not is_own_figure(path):
            raise UserError(f"{path} exists and is not an attention figure that generate wrote: it is left as it is")
        remove_stale_temps(path)
        out.append(path)
    return out


def generate(cfg: GenerateConfig) -> Iterator[dict]:
    """Caption every image, yielding {"image": PATH, "caption": TEXT} (and "attention": FIGURE with
    `cfg.attention`) per image, in order. One bad image among several is reported and skipped; a single
    bad image, or none readable, is a UserError. When a figure cannot be written, its caption is yielded
    first, then the UserError is raised."""
    if not cfg.images:
        raise UserError("give at least one --image (a file or a folder)")
    if not 1 <= cfg.beam_size <= MAX_BEAM_SIZE:
        raise UserError(f"--beam-size must be between 1 and {MAX_BEAM_SIZE}")
    paths = expand_images(cfg.images)
    if not paths:
        raise UserError("no images to caption")
    single = len(paths) == 1
    if single:
        _check_image_file(paths[0])
    figures = figure_paths(cfg.attention, paths) if cfg.attention is not None else None
    device = resolve_device(cfg.device)
    captioner = Captioner.load(cfg.model, device)
    captioned, failed = 0, 0
    for start in range(0, len(paths), cfg.batch_size):
        opened = []
        for i in range(start, min(start + cfg.batch_size, len(paths))):
            try:
                _check_image_file(paths[i])
                opened.append((i, open_image(paths[i], captioner.transform)))
            except (*DECODE_ERRORS, UserError) as e:
                if single:
                    raise UserError(f"cannot read image {paths[i]}: {_reason(e)}") from None
                log.warning(f"skipped {paths[i]}: {_reason(e)}")
                failed += 1
        if not opened:
            continue
        pixels = torch.stack([resize_uint8(img, captioner.transform) for _, img in opened])
        for (i, img), d in zip(opened, captioner.caption(pixels, cfg.beam_size), strict=True):
            item = {"image": str(paths[i]), "caption": captioner.vocab.decode(d.tokens)}
            captioned += 1
            if figures is not None:
                try:
                    item["attention"] = str(attention_figure(img, captioner.words(d), d.attention, figures[i]))
                except UserError:
                    yield item  # the caption is not lost with its figure
                    raise
            yield item
    if failed:
        log.warning(f"{failed} of {len(paths)} images could not be read; {captioned} captioned")
    if not captioned:
        raise UserError("none of the images could be read")


def _key(path: Path) -> str:
    """A figure's name as a file system that normalises or folds case sees it (macOS, Windows)."""
    return unicodedata.normalize("NFC", str(path)).casefold()


def _check_image_file(path: Path) -> None:
    """Only regular files are opened: a FIFO would block, /dev/zero never ends."""
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is not an image file")


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, UserError) else describe(e)
