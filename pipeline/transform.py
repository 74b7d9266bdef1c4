"""The one image transform, shared by `extract` and `generate` and recorded in the store.

Pillow open, EXIF transpose, RGB, resize to 224x224 (bilinear), scale to [0, 1], ImageNet mean/std.
Split in two so that the cheap, parallel part (decode + resize, uint8) runs in DataLoader workers and
the arithmetic part (float, normalise) runs on the device, batched. On CUDA, extract decodes plain JPEGs on
the GPU instead (pipeline/jpeg.py: the same pixels as Pillow's decoder, within nvjpeg's rounding) and resizes
them there with this same `resize_uint8`, given a tensor: within 1 of Pillow's resize when it shrinks.

"RGB" is Pillow's `convert("RGB")`, with one exception: Pillow clips 16-bit grey images (PNG, TIFF and PGM
with 16 bits a sample: modes `I;16`, `I;16B`, `I;16L`, `I;16N` and `I`) to 0..255, which turns almost every
pixel white; they are scaled to 8 bits instead (v / 257, rounded), so a 16-bit image gives the features of
its 8-bit version. Pillow already reads 16-bit RGB, RGBA and grey+alpha PNGs as 8 bits a sample. Alpha
(RGBA, LA, palette transparency) is dropped: transparent pixels show the colour stored under them, as
`convert("RGB")` does. 1-bit images become black and white; CMYK is converted by Pillow's formula.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Errors a bad image file can raise: truncated or zero-byte (OSError, incl. UnidentifiedImageError),
# a decompression bomb past Pillow's guard, odd headers (ValueError, SyntaxError, EOFError). Reading the
# file can also fail (OSError): `is_read_error` tells those apart.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def is_read_error(e: BaseException) -> bool:
    """True for a failure to read the file (missing, permission denied, an I/O error: worth retrying later),
    False for a file that was read but cannot be decoded (for good). The operating system sets `errno` on
    the first kind; Pillow raises its decoding errors ("cannot identify image file", "image file is
    truncated", ...) as OSError without one."""
    return isinstance(e, OSError) and e.errno is not None and not isinstance(e, Image.UnidentifiedImageError)


@dataclass(frozen=True)
class TransformConfig:
    size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    exif_transpose: bool = True
    library: str = "pillow"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def open_image(
    path: str | Path | BinaryIO, config: TransformConfig = TransformConfig(), formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Open an image (a path, or a binary file object such as io.BytesIO) as RGB, EXIF-rotated. `formats`
    limits the decoders Pillow may try (e.g. ("JPEG", "PNG", "WEBP")). Raises one of DECODE_ERRORS on a bad file."""
    with warnings.catch_warnings():
        # Pillow warns before its DecompressionBombError threshold (the error itself stays an error), when
        # a palette image's transparency is dropped (what the transform does), and about damaged metadata
        # ("Corrupt EXIF data", "Tag data larger than file"). Python would print each as two lines of
        # source location in the middle of extract's output; a file that cannot be used raises instead.
        warnings.simplefilter("ignore")
        with Image.open(path, formats=formats) as img:
            img.load()
            if config.exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.mode in _SIXTEEN_BIT_MODES:
                img = _to_8_bit(img)
            return img.convert("RGB")


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grey image (0..65535) as 8-bit grey, v / 257 rounded: 257 * v maps back to v exactly."""
    a = np.asarray(img).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def resize_uint8(img: Image.Image | torch.Tensor, config: TransformConfig = TransformConfig()) -> torch.Tensor:
    """(3, size, size) uint8 tensor of the resized RGB image: a Pillow image, or a uint8 RGB tensor (3, H, W) or
    a batch of same-sized ones (B, 3, H, W) on any device (extract's GPU decoding), resized there."""
    if isinstance(img, torch.Tensor):
        return _resize_tensor(img, config)
    img = img.resize((config.size, config.size), _RESAMPLE[config.interpolation])
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _resize_tensor(x: torch.Tensor, config: TransformConfig) -> torch.Tensor:
    """Pillow's resize, on a uint8 tensor: the same antialiased filter (torch's `antialias=True` is modelled on
    Pillow's), in Pillow's order (the width first, rounded to 8 bits, then the height; a side already at
    `size` is left alone). Float32 on any device. Not bit-exact: on the 13 Flickr photos of ../shared/data,
    within 1 of Pillow's 8-bit value everywhere, and equal in 99.4-99.9% of the values for 11 of them; in 80-86%
    for the two taller than wide by more than ~1.4, for which Pillow's build here runs the height first. Small
    images that are enlarged: within 2."""
    if x.dtype != torch.uint8 or x.shape[-3] != 3:
        raise ValueError(f"expected a uint8 RGB tensor (..., 3, H, W), not {x.dtype} {tuple(x.shape)}")
    batch = x if x.dim() == 4 else x[None]
    y = batch.float()  # (B, 3, H, W)
    size = config.size
    for target in ((y.shape[-2], size), (size, size)):  # width, then height
        if tuple(y.shape[-2:]) != target:
            y = torch.nn.functional.interpolate(y, size=target, mode=config.interpolation, antialias=True)
            y = y.round_().clamp_(0, 255)
    y = y.to(torch.uint8)  # (B, 3, size, size)
    return y if x.dim() == 4 else y[0]


def load_uint8(path: str | Path, config: TransformConfig = TransformConfig()) -> torch.Tensor:
    """Decode and resize one image file: the worker-side half of the transform."""
    return resize_uint8(open_image(path, config), config)


def normalize(batch: torch.Tensor, config: TransformConfig = TransformConfig(), dtype=torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float, scaled to [0, 1] and normalised, on the batch's device."""
    mean = torch.tensor(config.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    return (batch.to(dtype) / 255.0 - mean) / std
