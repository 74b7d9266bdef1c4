"""extract's loop: decode the images of the rows in workers (`ImageFiles`, `loader`; on CUDA the plain JPEGs
on the GPU instead: `jpegs`), run the encoder on each batch and write the rows through a writer
(`extract_rows`). A bad image is a status, never an exception."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.console import progress
from pipeline.datasets import CaptionSet
from pipeline.encoder import encode
from pipeline.errors import UserError, describe
from pipeline.extract.config import ExtractConfig
from pipeline.extract.jpegs import DeviceDecoder, ImageBytes, collate
from pipeline.runtime import autocast, default_workers
from pipeline.store import DTYPES, SKIPPED, UNREADABLE, WRITTEN, Writer
from pipeline.transform import DECODE_ERRORS, TransformConfig, is_read_error, load_uint8, normalize

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class RowWriter(Protocol):
    """What the rows are written through: store.Writer in one process, shared.ShareWriter on a rank."""

    def write(self, rows: np.ndarray, features: np.ndarray | None, status: int) -> None: ...
    def finish(self) -> dict: ...
    def close(self) -> None: ...


class ImageFiles(Dataset):
    """Decodes one image per item in a worker. Never raises for a bad file: it yields the row, the pixels
    (zeros when it failed), the status the row gets (written, skipped or unreadable) and the reason."""

    def __init__(self, root: Path, names: list[str], rows: np.ndarray, transform: TransformConfig) -> None:
        self.root, self.names, self.rows, self.transform = root, names, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, str]:
        return self.load(int(self.rows[i]))

    def load(self, row: int) -> tuple[int, torch.Tensor, int, str]:
        size = self.transform.size
        try:
            return row, load_uint8(self.root / self.names[row], self.transform), WRITTEN, ""
        except DECODE_ERRORS + (Exception,) as e:
            # Beyond DECODE_ERRORS, Pillow's decoders raise odd types on malformed files (struct.error,
            # IndexError, OverflowError...): the file cannot be decoded, and the run must go on.
            status = UNREADABLE if is_read_error(e) else SKIPPED
            return row, torch.zeros(3, size, size, dtype=torch.uint8), status, describe(e)


def _die_with_parent(parent: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the kernel SIGKILLs this worker when extract dies, however it dies. A
    worker otherwise outlives a kill -9 of extract by up to 5 s (the poll period of its watchdog), keeping
    the store's lock (inherited at fork) held, so that an immediate rerun was refused."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # extract died before prctl took effect: nobody will send the signal
        os._exit(0)


def loader(
    cfg: ExtractConfig, captions: CaptionSet, rows: np.ndarray, cuda: bool, decode_on: torch.device | None = None
) -> DataLoader:
    """The decoded images of `rows`, in order, in batches of cfg.batch_size, from cfg.workers processes. With
    `decode_on`, plain JPEGs come as bytes, to be decoded there (`jpegs.Batch`, `jpegs.DeviceDecoder`)."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    # fork: a worker starts in ~0.1 s; forkserver and spawn import torch again in each (8-10 s measured).
    fork = workers > 0 and "fork" in multiprocessing.get_all_start_methods()
    files = ImageFiles(cfg.images.resolve(), captions.images, rows, cfg.transform)
    return DataLoader(
        files if decode_on is None else ImageBytes(files),
        batch_size=cfg.batch_size,
        collate_fn=None if decode_on is None else partial(collate, cfg.transform.size),
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_die_with_parent, os.getpid()) if workers > 0 else None,
        multiprocessing_context="fork" if fork else None,
    )


def extract_rows(
    cfg: ExtractConfig,
    trunk: torch.nn.Module,
    device: torch.device,
    captions: CaptionSet,
    rows: np.ndarray,
    open_writer: Callable[[], RowWriter] | None = None,
    decode_on: torch.device | None = None,
) -> tuple[dict, dict]:
    """Decode, encode and write `rows`; returns the store's counts and this run's. A dead decoding worker and
    running out of memory are UserErrors; either way every batch written so far is kept. `open_writer`: what
    the rows are written through (store.Writer by default; one rank's share under torchrun). `decode_on`:
    the device that decodes plain JPEGs (jpegs.decode_device), None: Pillow in the workers decodes all."""
    try:
        writer = open_writer or partial(Writer, cfg.store)
        return _encode_and_write(cfg, trunk, device, captions, rows, writer, decode_on)
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
    open_writer: Callable[[], RowWriter],
    decode_on: torch.device | None,
) -> tuple[dict, dict]:
    cuda = device.type == "cuda"
    trunk = trunk.to(device, memory_format=torch.channels_last)
    np_dtype = DTYPES[cfg.dtype]
    images = loader(cfg, captions, rows, cuda, decode_on)
    # plain JPEGs decoded on decode_on, to (rows, pixels, status, reasons) as the CPU path's loader gives them
    decoder = DeviceDecoder(images.dataset.files, decode_on, cfg.transform) if decode_on is not None else None
    # The iterator forks the decoding workers before the store is opened for writing, so that they never
    # hold its file descriptor, nor the HDF5 lock on it.
    batches = iter(images)
    now = {"written_now": 0, "skipped_now": 0, "unreadable_now": 0}
    writer = open_writer()
    try:
        with progress(len(rows), "extract", unit="img") as advance, torch.inference_mode():
            for batch in batches:
                batch_rows, pixels, status, reasons = decoder(batch) if decoder is not None else batch
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
    return counts, now | {"device_decoded_now": decoder.decoded if decoder is not None else 0}


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
        log.warning(f"skipped {printable(name)} for now: cannot read it ({printable(reason)}); the next run retries it")
    else:
        log.warning(f"skipped {printable(name)}: cannot decode it ({printable(reason)})")
