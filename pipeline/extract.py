"""`extract`: run the frozen ResNet50 once over every captioned image and fill the feature store (its layer4
output, or with `layer="layer3"` the layer3 output that fit can fine-tune layer4 from).

What it promises, and how:

- One writer per store: the whole run holds `exclusive(store)`; a second extract is told the pid of the
  first. Readers (fit, evaluate) never take that lock; HDF5's own lock keeps them out of a file that is
  being written, and they are told so in one line.
- Nothing the user made is replaced: `--store` must be a store made by extract, or not exist.
  `--overwrite` replaces only a store made by extract.
- Nothing done is lost: rows are written in place and resumed after Ctrl-C, kill -9, a full disk or a dead
  decoding worker. When the image folder or captions changed since, the store is rebuilt around the rows
  that are still valid (`store.create(..., carry=...)`) and only the new images are extracted.
- A read error (permission, I/O, a file gone) is not a bad image: its row is marked unreadable and the
  next run retries it. Only an image that cannot be decoded is skipped for good.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from pipeline import distributed
from pipeline.console import info, progress, warn
from pipeline.datasets import SPLITS, CaptionSet, read_captions
from pipeline.encoder import ENCODER_NAMES, build_encoder, encode
from pipeline.errors import UserError, describe
from pipeline.files import check_writable_folder, exclusive, remove_stale_temps
from pipeline.runtime import autocast, default_workers, resolve_device
from pipeline.store import (
    DTYPES,
    FORMAT_VERSION,
    HDF5_SIGNATURE,
    PENDING,
    SKIPPED,
    UNREADABLE,
    WRITTEN,
    Carry,
    NotAStoreError,
    Writer,
    create,
    mismatches,
    open_file,
    read_attrs,
    read_strings,
    row_bytes,
)
from pipeline.transform import DECODE_ERRORS, TransformConfig, is_read_error, load_uint8, normalize

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
OLD_PARTIAL_SUFFIX = ".partial"  # where versions before the lock built a new store


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
    layer: str = "layer4"  # the ResNet50 stage stored: layer4 (7x7x2048) or layer3 (14x14x1024)
    transform: TransformConfig = field(default_factory=TransformConfig)


class ImageFiles(Dataset):
    """Decodes one image per item in a worker. Never raises for a bad file: it yields the row, the pixels
    (zeros when it failed), the status the row gets (written, skipped or unreadable) and the reason."""

    def __init__(self, root: Path, names: list[str], rows: np.ndarray, transform: TransformConfig) -> None:
        self.root, self.names, self.rows, self.transform = root, names, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        row = int(self.rows[i])
        size = self.transform.size
        try:
            return row, load_uint8(self.root / self.names[row], self.transform), WRITTEN, ""
        except DECODE_ERRORS + (Exception,) as e:
            # Beyond DECODE_ERRORS, Pillow's decoders raise odd types on malformed files (struct.error,
            # IndexError, OverflowError...): the file cannot be decoded, and the run must go on.
            status = UNREADABLE if is_read_error(e) else SKIPPED
            return row, torch.zeros(3, size, size, dtype=torch.uint8), status, describe(e)


def provenance(weights: dict, transform: TransformConfig, dtype: str, layer: str = "layer4") -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "encoder": ENCODER_NAMES[layer],
        "layer": layer,
        **weights,
        "transform": json.dumps(transform.to_dict(), sort_keys=True),
        "dtype": dtype,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "pillow_version": PIL.__version__,
    }


def extract(cfg: ExtractConfig) -> dict:
    """Fill the store for every captioned, decodable image; resumable. Returns the run's summary."""
    if distributed.launched_world() > 1:  # under torchrun the processes share the images
        from pipeline import distributed_extract

        return distributed_extract.extract(cfg)
    start = time.perf_counter()
    device, images, path = check_options(cfg)

    with exclusive(path, what=str(path)):
        _remove_leftovers(path)
        old = _existing_store(path)
        captions = read_captions(images, cfg.captions)
        info(f"captions: {captions.source} ({captions.layout}), {len(captions)} images on disk")
        for reason, count in sorted(captions.problems.items()):
            if count:
                warn(f"{count} {reason}")
        if not captions.images:
            raise UserError(f"none of the captioned images were found under {images}")
        trunk, weights = build_encoder(cfg.weights, cfg.layer)
        prov = provenance(weights.to_dict(), cfg.transform, cfg.dtype, cfg.layer)
        summary = {"store": str(path), "images": len(captions), "captions": sum(map(len, captions.captions))}
        rows = _prepare_store(cfg, captions, prov, old)
        if rows is None:
            return (
                summary
                | _counts(old)
                | {"written_now": 0, "skipped_now": 0, "unreadable_now": 0, "seconds": time.perf_counter() - start}
            )
        counts, now = _extract_rows(cfg, trunk, device, captions, rows)

    if counts["images_written"] == 0:
        what = "read or decoded" if counts["images_unreadable"] else "decoded"
        raise UserError(f"no image under {images} could be {what}; nothing was extracted")
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    summary |= counts | now | {"seconds": seconds, "bytes": size}
    info(
        f"done: {counts['images_written']} images written, {_skipped_text(counts)}, {summary['captions']} captions, "
        f"{size / 2**30:.2f} GiB at {path}, {now['written_now']} this run in {seconds:.1f}s"
    )
    return summary


def check_options(cfg: ExtractConfig) -> tuple[torch.device, Path, Path]:
    """What can be refused before any work: bad values, no such device, a missing images folder, a --store
    that is a folder or in a folder that cannot be written. Returns the device, images folder, store path."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.layer not in ENCODER_NAMES:
        raise UserError(f"--layer must be one of {', '.join(ENCODER_NAMES)}, not {cfg.layer!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    device = resolve_device(cfg.device)
    images, path = Path(cfg.images), Path(cfg.store)
    if not images.is_dir():
        raise UserError(
            f"images folder {images} is a file, not a folder"
            if images.exists()
            else f"images folder not found: {images}"
        )
    if path.is_dir():
        raise UserError(f"--store {path} is a folder; give a file path such as {path / 'features.h5'}")
    check_writable_folder(path.parent, "the --store folder")  # before reading a single image
    return device, images, path


def _skipped_text(counts: dict) -> str:
    undecodable, unreadable = counts["images_skipped"], counts["images_unreadable"]
    if not unreadable:
        return f"{undecodable} skipped"
    return (
        f"{undecodable + unreadable} skipped ({undecodable} undecodable, {unreadable} unreadable: "
        "rerun to retry the unreadable ones)"
    )


def _counts(attrs: dict | None) -> dict:
    attrs = attrs or {}
    return {k: int(attrs.get(k, 0)) for k in ("images_written", "images_skipped", "images_unreadable")}


# --- the store: what is there, and what to do with it --------------------------------------------------------


def _remove_leftovers(path: Path) -> None:
    """Temp files of a run that was killed while it built a store (we hold the lock: nobody else is), and
    the `NAME.partial` file that earlier versions built, when it is one (an HDF5 file, or empty)."""
    remove_stale_temps(path, locked=True)
    partial_file = path.with_name(path.name + OLD_PARTIAL_SUFFIX)
    with contextlib.suppress(OSError):
        with open(partial_file, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
        if head in (b"", HDF5_SIGNATURE):
            partial_file.unlink()


def _existing_store(path: Path) -> dict | None:
    """The attributes of the store at `path`, None when there is none. Anything else there is refused,
    even with --overwrite: extract replaces only what it made."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return read_attrs(path)
    except NotAStoreError as e:
        raise UserError(
            f"{e}; extract replaces only a store it made, even with --overwrite: choose another --store"
        ) from None


def _prepare_store(cfg: ExtractConfig, captions: CaptionSet, prov: dict, old: dict | None) -> np.ndarray | None:
    """Create, resume, rebuild or refuse the store. Returns the rows still to extract, or None when the
    store is complete and up to date."""
    path, n, bytes_per_row = Path(cfg.store), len(captions), row_bytes(cfg.dtype, cfg.layer)
    if old is not None:
        diffs = mismatches(old, prov)
        if diffs and not cfg.overwrite:
            raise UserError(
                f"{path} was made differently: {'; '.join(diffs)}. "
                "Pass --overwrite to replace it, or --store to write another file"
            )
        if not cfg.overwrite:
            return _resume_or_rebuild(path, captions, prov)
        _check_no_reader(path)
        info(f"--overwrite: replacing {path}")
    _check_space(path, n * bytes_per_row, reclaimed=_allocated(path) if old is not None else 0)
    create(path, captions, prov)
    return np.arange(n)


def _resume_or_rebuild(path: Path, captions: CaptionSet, prov: dict) -> np.ndarray | None:
    """A store made the same way: resume it in place when it holds the same images, captions and splits;
    otherwise rebuild it around the rows of the images that are still there."""
    with open_file(path, "r") as f:
        names, status, split = read_strings(f["images"]), f["status"][:], f["split"][:]
        texts, owners = read_strings(f["captions/text"]), f["captions/image"][:]
    same_images = names == captions.images
    same_captions = (
        texts == [t for caps in captions.captions for t in caps]
        and np.array_equal(owners, np.repeat(np.arange(len(captions)), [len(c) for c in captions.captions]))
        and np.array_equal(split, [SPLITS.index(s) for s in captions.splits])
    )
    if same_images and same_captions:
        return _resume(path, status, prov)
    return _rebuild(path, captions, prov, names, status)


def _resume(path: Path, status: np.ndarray, prov: dict) -> np.ndarray | None:
    todo = np.flatnonzero((status == PENDING) | (status == UNREADABLE))
    done, pending = int((status == WRITTEN).sum()), int((status == PENDING).sum())
    if not len(todo):
        skipped = int((status == SKIPPED).sum())
        info(f"{path} is already complete ({done} images written, {skipped} skipped): nothing to do")
        return None
    retry = f", {len(todo) - pending} unreadable ones to retry" if len(todo) > pending else ""
    info(f"resuming {path}: {done} of {len(status)} images written, {pending} to go{retry}")
    _check_no_reader(path)
    holes = max(path.stat().st_size - _allocated(path), 0)
    _check_space(path, min(holes, len(todo) * row_bytes(prov["dtype"], prov["layer"])))
    return todo


def _rebuild(path: Path, captions: CaptionSet, prov: dict, names: list[str], status: np.ndarray) -> np.ndarray:
    """A new store for the current captions, into which the rows of the old one whose image is still
    captioned are carried with their features and status (written or skipped; pending and unreadable rows
    are redone). Returns the rows left to extract."""
    _check_no_reader(path)
    index = {name: i for i, name in enumerate(names)}
    pairs = np.array([(index[name], j) for j, name in enumerate(captions.images) if name in index], dtype=np.int64)
    old_rows, new_rows = (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0, np.int64),) * 2
    keep = np.isin(status[old_rows], (WRITTEN, SKIPPED))
    carry = Carry(path, old_rows[keep], new_rows[keep], status[old_rows[keep]])
    kept = len(pairs)
    if kept == len(names) == len(captions):
        info(f"the captions or splits changed since {path} was made: rebuilding it with the current ones")
    else:
        info(
            f"the images changed since {path} was made: {kept} images kept, {len(names) - kept} removed, "
            f"{len(captions) - kept} added; rebuilding it around the {int(keep.sum())} finished ones"
        )
    bytes_per_row = row_bytes(prov["dtype"], prov["layer"])
    _check_space(path, int((carry.status == WRITTEN).sum()) * bytes_per_row)  # the copies, beside the old store
    _check_space(path, len(captions) * bytes_per_row, reclaimed=_allocated(path))
    create(path, captions, prov, carry=carry)
    todo = np.ones(len(captions), dtype=bool)
    todo[carry.new_rows] = False
    return np.flatnonzero(todo)


def _check_no_reader(path: Path) -> None:
    """Refuse, before any work, a store that another process has open (HDF5's lock): replacing or writing
    it under a running fit or evaluate would change the rows it reads."""
    with open_file(path, "r+"):
        pass


def _allocated(path: Path) -> int:
    """Bytes the file takes on disk (a store is sparse until its rows are written)."""
    try:
        return os.stat(path).st_blocks * 512
    except (OSError, AttributeError):
        return 0


def _check_space(path: Path, need: int, reclaimed: int = 0) -> None:
    """Refuse up front when the store's disk lacks room for `need` more bytes of features (`reclaimed`:
    what replacing the old store frees). Running out mid-way is handled too, but only after hours of work."""
    try:
        st = os.statvfs(path.parent)
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd filesystem: the write errors remain
        return
    free = st.f_bavail * st.f_frsize
    if need > free + reclaimed:
        raise UserError(
            f"not enough disk space for {path}: {_size(need)} of features to write, {_size(free + reclaimed)} "
            f"free on its disk ({row_bytes('float16'):,} bytes an image in float16, "
            f"{row_bytes('float16', 'layer3'):,} for --layer layer3)"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- running the encoder over the rows ---------------------------------------------------------------------------


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the kernel SIGKILLs this worker when extract dies, however it dies. A
    worker otherwise outlives a kill -9 of extract by up to 5 s (the poll period of its watchdog), keeping
    the store's lock (inherited at fork) held, so that an immediate rerun was refused."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # extract died before prctl took effect: nobody will send the signal
        os._exit(0)


def _loader(cfg: ExtractConfig, captions: CaptionSet, rows: np.ndarray, cuda: bool) -> DataLoader:
    workers = default_workers() if cfg.workers is None else cfg.workers
    # fork: a worker starts in ~0.1 s; forkserver and spawn import torch again in each (8-10 s measured).
    fork = workers > 0 and "fork" in multiprocessing.get_all_start_methods()
    return DataLoader(
        ImageFiles(cfg.images.resolve(), captions.images, rows, cfg.transform),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_die_with_parent, os.getpid()) if workers > 0 else None,
        multiprocessing_context="fork" if fork else None,
    )


def _extract_rows(
    cfg: ExtractConfig,
    trunk: torch.nn.Module,
    device: torch.device,
    captions: CaptionSet,
    rows: np.ndarray,
    open_writer: Callable[[], Writer] | None = None,
) -> tuple[dict, dict]:
    """Decode, encode and write `rows`; returns the store's counts and this run's. A dead decoding worker and
    running out of memory are UserErrors; either way every batch written so far is kept. `open_writer`: what
    the rows are written through (store.Writer by default; one rank's share under torchrun)."""
    try:
        return _encode_and_write(cfg, trunk, device, captions, rows, open_writer or partial(Writer, cfg.store))
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"out of memory on {device} with --batch-size {cfg.batch_size}: rerun with a smaller --batch-size "
            "(every finished batch is kept)"
        ) from None
    except (RuntimeError, ConnectionError, EOFError) as e:
        # torch says "DataLoader worker ... exited unexpectedly" or "... is killed by signal"; a worker killed
        # while it sends a batch breaks the pipe instead (ConnectionResetError, EOFError). Nothing else in
        # the loop raises these: store writes are UserErrors, unreadable images are statuses.
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(". ")
        raise UserError(
            f"a decoding worker died ({reason}); every finished batch is kept: rerun the same command to resume"
        ) from None


def _encode_and_write(
    cfg: ExtractConfig,
    trunk: torch.nn.Module,
    device: torch.device,
    captions: CaptionSet,
    rows: np.ndarray,
    open_writer: Callable[[], Writer],
) -> tuple[dict, dict]:
    cuda = device.type == "cuda"
    trunk = trunk.to(device, memory_format=torch.channels_last)
    np_dtype = DTYPES[cfg.dtype]
    # The iterator forks the decoding workers before the store is opened for writing, so that they never
    # hold its file descriptor, nor the HDF5 lock on it.
    batches = iter(_loader(cfg, captions, rows, cuda))
    now = {"written_now": 0, "skipped_now": 0, "unreadable_now": 0}
    writer = open_writer()
    try:
        with progress(len(rows), "extract", unit="img") as advance, torch.inference_mode():
            for batch_rows, pixels, status, reasons in batches:
                batch_rows, status = batch_rows.numpy(), status.numpy()
                ok = status == WRITTEN
                for row, state, reason in zip(batch_rows[~ok], status[~ok], np.asarray(reasons)[~ok], strict=True):
                    _warn_skipped(captions.images[row], int(state), str(reason))
                if ok.any():
                    x = pixels[torch.from_numpy(ok)] if not ok.all() else pixels
                    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    with autocast(device, dtype=torch.float16):  # fp16 keeps 3 more bits than bf16; stored as fp16
                        feats = encode(trunk, normalize(x, cfg.transform))
                    # cast on the device: half the bytes to copy back for float16 stores
                    feats = feats.to(torch.float16 if np_dtype == np.float16 else torch.float32).cpu().numpy()
                    writer.write(batch_rows[ok], feats, WRITTEN)
                for state, key in ((SKIPPED, "skipped_now"), (UNREADABLE, "unreadable_now")):
                    if (status == state).any():
                        writer.write(batch_rows[status == state], None, state)
                    now[key] += int((status == state).sum())
                now["written_now"] += int(ok.sum())
                advance(len(batch_rows))
        counts = writer.finish()
    finally:
        _shut_down(batches)
        writer.close()
    return counts, now


def _shut_down(batches) -> None:
    """Stop the decoding workers now. `del` would not: a loader's error keeps the loader alive in its
    traceback, and while it lives, torch's SIGCHLD handler raises a dead worker's error again wherever Python
    is when the signal comes, after extract's own error line too. torch has no public call for this; without
    it (another loader class), the loader is left to its own __del__."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def printable(text: str) -> str:
    """A name or message on one line: control characters escaped (\\n), and so are the bytes of a file name
    that is not UTF-8 (Python holds them as surrogates: \\xff)."""

    def escape(m: re.Match) -> str:
        c = ord(m.group())
        if 0xDC80 <= c <= 0xDCFF:  # os.fsdecode's surrogateescape of byte c - 0xDC00
            return f"\\x{c - 0xDC00:02x}"
        return m.group().encode("unicode_escape").decode("ascii")

    return _UNPRINTABLE.sub(escape, text)


def _warn_skipped(name: str, status: int, reason: str) -> None:
    if status == UNREADABLE:
        warn(f"skipped {printable(name)} for now: cannot read it ({printable(reason)}); the next run retries it")
    else:
        warn(f"skipped {printable(name)}: cannot decode it ({printable(reason)})")
