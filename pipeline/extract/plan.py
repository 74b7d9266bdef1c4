"""extract's plan: what can be refused before any work, and what to do with the store (create, resume,
rebuild or refuse it), which gives the rows left to extract. Under torchrun, rank 0 alone runs what touches
the store (`lock_store`, `prepare_store`)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.datasets import SPLITS, CaptionSet
from pipeline.encoder import ENCODER_NAMES
from pipeline.errors import UserError
from pipeline.extract.config import ExtractConfig
from pipeline.files import check_writable_folder, exclusive, remove_stale_temps
from pipeline.store import (
    DTYPES,
    HDF5_SIGNATURE,
    PENDING,
    SKIPPED,
    UNREADABLE,
    WRITTEN,
    Carry,
    NotAStoreError,
    create,
    mismatches,
    open_file,
    read_attrs,
    read_strings,
    row_bytes,
)

log = logging.getLogger(__name__)

OLD_PARTIAL_SUFFIX = ".partial"  # where versions before the lock built a new store


def check_options(cfg: ExtractConfig) -> tuple[Path, Path]:
    """What can be refused before any work: bad values, a missing images folder, a --store that is a folder or
    in a folder that cannot be written (the device is `distributed.session`'s to check). Returns the images
    folder and the store path."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if cfg.layer not in ENCODER_NAMES:
        raise UserError(f"--layer must be one of {', '.join(ENCODER_NAMES)}, not {cfg.layer!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
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
    return images, path


def lock_store(path: Path, held: contextlib.ExitStack) -> dict | None:
    """The store's one-writer lock (held by `held` until the run ends), leftovers of killed runs removed, and
    the attributes of the store already there (None when there is none)."""
    held.enter_context(exclusive(path, what=str(path)))
    remove_leftovers(path)
    return existing_store(path)


def check_written(images: Path, counts: dict) -> None:
    """A run that wrote no image at all is an error."""
    if counts["images_written"] == 0:
        what = "read or decoded" if counts["images_unreadable"] else "decoded"
        raise UserError(f"no image under {images} could be {what}; nothing was extracted")


def store_counts(attrs: dict | None) -> dict:
    """The written, skipped and unreadable counts a store records (all 0 for no store)."""
    attrs = attrs or {}
    return {k: int(attrs.get(k, 0)) for k in ("images_written", "images_skipped", "images_unreadable")}


# --- the store: what is there, and what to do with it --------------------------------------------------------


def remove_leftovers(path: Path) -> None:
    """Temp files of a run that was killed while it built a store (we hold the lock: nobody else is), and
    the `NAME.partial` file that earlier versions built, when it is one (`_old_partial`)."""
    remove_stale_temps(path, locked=True)
    partial_file = path.with_name(path.name + OLD_PARTIAL_SUFFIX)
    if _old_partial(partial_file):
        with contextlib.suppress(OSError):
            partial_file.unlink()


def _old_partial(path: Path) -> bool:
    """An empty file, or an HDF5 file that is a store begun by extract (its `format_version`) or an empty shell
    (killed before anything was written in it). A user's own file of that name, HDF5 or not, is kept; so is a
    file that cannot be read or opened."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_SIGNATURE))
        if head == b"":
            return True
        if head != HDF5_SIGNATURE:
            return False
        with h5py.File(path, "r") as f:
            return "format_version" in f.attrs or (len(f) == 0 and len(f.attrs) == 0)
    except (OSError, RuntimeError, ValueError):
        return False


def existing_store(path: Path) -> dict | None:
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


def prepare_store(cfg: ExtractConfig, captions: CaptionSet, prov: dict, old: dict | None) -> np.ndarray | None:
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
        log.info(f"--overwrite: replacing {path}")
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
        log.info(f"{path} is already complete ({done} images written, {skipped} skipped): nothing to do")
        return None
    retry = f", {len(todo) - pending} unreadable ones to retry" if len(todo) > pending else ""
    log.info(f"resuming {path}: {done} of {len(status)} images written, {pending} to go{retry}")
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
        log.info(f"the captions or splits changed since {path} was made: rebuilding it with the current ones")
    else:
        log.info(
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
