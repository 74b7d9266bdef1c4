"""extract's GPU decoding: the workers read each file's bytes, and the plain JPEGs among them (most photos;
`pipeline.jpeg.device_decodable`) are decoded on the device in one batched call (nvjpeg) and resized there
with the transform's own `resize_uint8`. Every other file is decoded by Pillow in the worker, exactly as on
the CPU path, so it gets the same pixels, status and reason. A batch the device fails to decode is decoded
by Pillow, image by image, in this process.

Why: on an H200, Pillow's decode + resize (2.6 ms an image) in 15 workers fed the ResNet50 1,486 images/s
of the 12,421 it can take (BENCHMARKS.md); reading bytes costs the workers next to nothing."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.extract.config import DECODE_MODES
from pipeline.jpeg import decode, device_decodable, device_problem
from pipeline.store import WRITTEN
from pipeline.transform import TransformConfig, resize_uint8

log = logging.getLogger(__name__)

# Pixels (H x W) resized in one call, at most: a batch of same-sized photos is resized as one tensor, in
# slices of this many pixels (float32, 3 channels: 400 MB) so that a batch of large photos stays small.
RESIZE_PIXELS = 32 * 2**20


def decode_device(mode: str, device: torch.device) -> torch.device | None:
    """Where plain JPEGs are decoded: on `device` (nvjpeg), or None (Pillow in the workers, the CPU path).
    auto: on the device when it is CUDA and torchvision can decode there (else a warning, and the CPU path);
    gpu: the same, but a device that cannot is an error; cpu: always the CPU path."""
    if mode not in DECODE_MODES:
        raise UserError(f"--decode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if mode == "cpu":
        return None
    if device.type != "cuda":
        if mode == "gpu":
            raise UserError(f"--decode gpu needs a CUDA device, and extract runs on {device.type}: use --decode auto")
        return None
    problem = device_problem(device)
    if problem is None:
        return device
    if mode == "gpu":
        raise UserError(f"--decode gpu: torchvision cannot decode JPEGs on {device} ({problem}); use --decode cpu")
    log.warning(f"decoding JPEGs with Pillow: torchvision cannot decode them on {device} ({problem})")
    return None


def decoder_name(decode_on: torch.device | None) -> str:
    """The store's `jpeg_decoder` attribute: what decoded its plain JPEGs."""
    if decode_on is None:
        return "pillow"
    return ("nvjpeg" if decode_on.type == "cuda" else f"torchvision-{decode_on.type}") + "+pillow"


def announce(decode_on: torch.device | None, workers: int) -> None:
    if decode_on is not None:
        readers = f"{workers} worker processes" if workers else "this process"
        log.info(f"decoding JPEGs on {decode_on} ({decoder_name(decode_on)}); files read by {readers}")


class ImageBytes(torch.utils.data.Dataset):
    """Yields, for each row, `(row, pixels, status, reason)` as `encode.ImageFiles` does, except that the
    pixels of a plain JPEG are its file's bytes, a 1-D uint8 tensor, left for the device to decode."""

    def __init__(self, files) -> None:  # files: an encode.ImageFiles, which decodes the others with Pillow
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        row = int(self.files.rows[i])
        # A read error here is left to Pillow's path, which reads the file again and reports it as the CPU
        # path does (its exact message and status). So does any file that is not a plain JPEG: read twice,
        # the second time from the page cache.
        with contextlib.suppress(OSError):
            data = (self.files.root / self.files.names[row]).read_bytes()
            if device_decodable(data, Image.MAX_IMAGE_PIXELS):
                return row, torch.frombuffer(bytearray(data), dtype=torch.uint8), WRITTEN, ""
        return self.files[i]


@dataclass
class Batch:
    """What a worker hands over: the rows' statuses and reasons, the pixels Pillow decoded (failed rows: zeros)
    and the JPEGs' bytes, each with its places in the batch. No pixels travel for the JPEGs."""

    rows: torch.Tensor  # (B,) int64
    status: torch.Tensor  # (B,) int64
    reasons: list[str]
    pixels: torch.Tensor  # (K, 3, S, S) uint8, Pillow's
    at_pixels: list[int]  # where each of them goes in the batch
    jpegs: list[torch.Tensor]  # B - K files, (n_bytes,) uint8 each
    at_jpegs: list[int]

    def pin_memory(self) -> Batch:  # the DataLoader's pin thread calls this (pin_memory=True on CUDA)
        self.pixels = self.pixels.pin_memory()
        return self


def collate(size: int, items: list[tuple[int, torch.Tensor, int, str]]) -> Batch:
    rows, data, status, reasons = zip(*items, strict=True)
    at_pixels = [i for i, d in enumerate(data) if d.dim() == 3]
    at_jpegs = [i for i, d in enumerate(data) if d.dim() == 1]
    none = torch.zeros((0, 3, size, size), dtype=torch.uint8)
    pixels = torch.stack([data[i] for i in at_pixels]) if at_pixels else none
    jpegs = [data[i] for i in at_jpegs]
    return Batch(torch.tensor(rows), torch.tensor(status), list(reasons), pixels, at_pixels, jpegs, at_jpegs)


class DeviceDecoder:
    """Turns a worker's `Batch` into `(rows, pixels, status, reasons)` as the CPU path's loader gives them:
    pixels (B, 3, S, S) uint8, on `device` once a JPEG was decoded there. `decoded`: the JPEGs decoded on the
    device so far."""

    def __init__(self, files, device: torch.device, transform: TransformConfig) -> None:
        self.files, self.device, self.transform, self.decoded = files, device, transform, 0

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        if not batch.jpegs:
            return batch.rows, batch.pixels, batch.status, batch.reasons
        try:
            decoded = decode_resize(batch.jpegs, self.device, self.transform)  # (J, 3, S, S)
        except torch.cuda.OutOfMemoryError:
            raise  # extract's "out of memory ... --batch-size" error
        except (RuntimeError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning(f"{len(batch.jpegs)} JPEGs failed to decode on {self.device} ({reason}): Pillow decodes them")
            return batch.rows, self._with_pillow(batch), batch.status, batch.reasons
        self.decoded += len(batch.jpegs)
        size = self.transform.size
        pixels = torch.empty((len(batch.rows), 3, size, size), dtype=torch.uint8, device=self.device)
        pixels[batch.at_jpegs] = decoded
        if batch.at_pixels:
            pixels[batch.at_pixels] = batch.pixels.to(self.device, non_blocking=True)
        return batch.rows, pixels, batch.status, batch.reasons

    def _with_pillow(self, batch: Batch) -> torch.Tensor:
        """The CPU path for each JPEG of the batch, in this process: Pillow's pixels, status and reason. Returns
        the batch's pixels, on the CPU."""
        size = self.transform.size
        pixels = torch.zeros((len(batch.rows), 3, size, size), dtype=torch.uint8)
        if batch.at_pixels:
            pixels[batch.at_pixels] = batch.pixels
        for i in batch.at_jpegs:
            _, pixels[i], batch.status[i], batch.reasons[i] = self.files.load(int(batch.rows[i]))
        return pixels


def decode_resize(jpegs: list[torch.Tensor], device: torch.device, transform: TransformConfig) -> torch.Tensor:
    """(J, 3, S, S) uint8 on `device`: the JPEGs decoded there in one call, and resized there, photos of the
    same size together (most datasets have a few sizes: 500x375, 375x500, 500x333...)."""
    images = decode(jpegs, device)  # J x (3, H, W) uint8
    out = torch.empty((len(images), 3, transform.size, transform.size), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for k, image in enumerate(images):
        groups[tuple(image.shape)].append(k)
    for (_, h, w), ks in groups.items():
        step = max(1, RESIZE_PIXELS // (h * w))
        for part in np.array_split(ks, -(-len(ks) // step)):
            out[part.tolist()] = resize_uint8(torch.stack([images[k] for k in part]), transform)  # (k, 3, S, S)
    return out
