"""`extract`: run the frozen ResNet50 once over every captioned image and fill the feature store."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from pipeline import distributed
from pipeline import store as st
from pipeline.console import info, progress, warn
from pipeline.datasets import CaptionSet, read_captions
from pipeline.encoder import ENCODER_NAME, build_encoder, encode
from pipeline.errors import UserError, describe
from pipeline.runtime import autocast, default_workers, resolve_device
from pipeline.transform import DECODE_ERRORS, TransformConfig, load_uint8, normalize


@dataclass
class ExtractConfig:
    images: Path
    captions: Path | None = None
    store: Path = Path("cache/features.h5")
    weights: str = "IMAGENET1K_V1"
    batch_size: int = 64
    workers: int | None = None  # None: default_workers()
    device: str = "auto"
    dtype: str = "float16"
    overwrite: bool = False
    transform: TransformConfig = field(default_factory=TransformConfig)


class ImageFiles(Dataset):
    """Decodes one image per item in a worker; a bad file yields ok=False and the reason, never raises."""

    def __init__(self, root: Path, names: list[str], rows: np.ndarray, transform: TransformConfig) -> None:
        self.root, self.names, self.rows, self.transform = root, names, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        row = int(self.rows[i])
        size = self.transform.size
        try:
            return row, load_uint8(self.root / self.names[row], self.transform), True, ""
        except DECODE_ERRORS as e:
            return row, torch.zeros(3, size, size, dtype=torch.uint8), False, describe(e)


def provenance(weights: dict, transform: TransformConfig, dtype: str) -> dict:
    return {
        "format_version": st.FORMAT_VERSION,
        "encoder": ENCODER_NAME,
        **weights,
        "transform": json.dumps(transform.to_dict(), sort_keys=True),
        "dtype": dtype,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "pillow_version": PIL.__version__,
    }


def _prepare_store(cfg: ExtractConfig, captions: CaptionSet, prov: dict) -> bool:
    """Create, reuse or refuse the store. Returns True when there is nothing left to do."""
    path = cfg.store
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        partial.unlink()  # a creation interrupted before its rename: never a user's finished file
    if path.exists() and not cfg.overwrite:
        attrs = st.read_attrs(path)
        diffs = st.mismatches(attrs, prov)
        if not diffs:
            with h5py.File(path, "r") as f:
                names = [s.decode() if isinstance(s, bytes) else s for s in f["images"][:]]
            if names != captions.images:
                diffs.append(f"image list ({len(names)} in the store, {len(captions.images)} captioned now)")
        if diffs:
            raise UserError(
                f"{path} was made differently: {'; '.join(diffs)}. "
                "Pass --overwrite to replace it, or --store to write another file"
            )
        if attrs.get("complete"):
            info(
                f"{path} is already complete ({attrs.get('images_written')} images written, "
                f"{attrs.get('images_skipped')} skipped): nothing to do"
            )
            return True
        info(f"resuming {path}")
        return False
    if path.exists():
        info(f"--overwrite: replacing {path}")
        path.unlink()
    st.create(path, captions, prov)
    return False


def extract(cfg: ExtractConfig) -> dict:
    """Fill the store for every captioned, decodable image; resumable. Returns the run's summary."""
    if distributed.launched_world() > 1:  # under torchrun the processes share the images
        from pipeline import distributed_extract

        return distributed_extract.extract(cfg)
    start = time.perf_counter()
    if cfg.dtype not in st.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(st.DTYPES)}, not {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    device = resolve_device(cfg.device)
    captions = read_captions(cfg.images, cfg.captions)
    info(f"captions: {captions.source} ({captions.layout}), {len(captions)} images on disk")
    for reason, count in sorted(captions.problems.items()):
        if count:
            warn(f"{count} {reason}")
    if not captions.images:
        raise UserError(f"none of the captioned images were found under {cfg.images}")

    trunk, weights = build_encoder(cfg.weights)
    prov = provenance(weights.to_dict(), cfg.transform, cfg.dtype)
    summary = {"store": str(cfg.store), "images": len(captions), "captions": sum(map(len, captions.captions))}
    if _prepare_store(cfg, captions, prov):
        return summary | {"written_now": 0, "skipped_now": 0, "seconds": time.perf_counter() - start}

    writer = st.Writer(cfg.store)
    try:
        rows = writer.pending()
        written, skipped = _run(cfg, trunk, device, captions, rows, writer)
        counts = writer.finish()
    finally:
        writer.close()
    if counts["images_written"] == 0:
        raise UserError(f"no image under {cfg.images} could be decoded; nothing was extracted")
    seconds = time.perf_counter() - start
    size = cfg.store.stat().st_size
    summary |= counts | {"written_now": written, "skipped_now": skipped, "seconds": seconds, "bytes": size}
    info(
        f"done: {counts['images_written']} images written, {counts['images_skipped']} skipped (undecodable), "
        f"{summary['captions']} captions, {size / 2**30:.2f} GiB at {cfg.store}, "
        f"{written} this run in {seconds:.1f}s"
    )
    return summary


def _run(
    cfg: ExtractConfig,
    trunk: torch.nn.Module,
    device: torch.device,
    captions: CaptionSet,
    rows: np.ndarray,
    writer: st.Writer,
) -> tuple[int, int]:
    workers = default_workers() if cfg.workers is None else cfg.workers
    cuda = device.type == "cuda"
    trunk = trunk.to(device, memory_format=torch.channels_last)
    loader = DataLoader(
        ImageFiles(cfg.images.resolve(), captions.images, rows, cfg.transform),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    np_dtype = st.DTYPES[cfg.dtype]
    written = skipped = 0
    with progress(len(rows), "extract", unit="img") as advance, torch.inference_mode():
        for batch_rows, pixels, ok, reasons in loader:
            batch_rows = batch_rows.numpy()
            ok = ok.numpy().astype(bool)
            for row, reason in zip(batch_rows[~ok], np.asarray(reasons, dtype=object)[~ok], strict=True):
                warn(f"skipped {captions.images[row]}: {reason}")
            if ok.any():
                x = pixels[torch.from_numpy(ok)] if not ok.all() else pixels
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype=torch.float16):  # fp16 keeps 3 more bits than bf16; stored as fp16
                    feats = encode(trunk, normalize(x, cfg.transform))
                # cast on the device: half the bytes to copy back for float16 stores
                feats = feats.to(torch.float16 if np_dtype == np.float16 else torch.float32).cpu().numpy()
                writer.write(batch_rows[ok], feats, st.WRITTEN)
            if (~ok).any():
                writer.write(batch_rows[~ok], None, st.SKIPPED)
            written += int(ok.sum())
            skipped += int((~ok).sum())
            advance(len(batch_rows))
    return written, skipped
