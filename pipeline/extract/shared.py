"""The writer of `extract` under torchrun: the ranks share the images and fill one store, the same file a single
process makes (same `images` order, same features within float tolerance, same statuses). In one process
`writer_for` gives store.Writer, and nothing here runs.

How the work is shared:

- Rank 0 alone decides what the store is: it takes the store's one-writer lock for the whole run, and
  creates, resumes, rebuilds or refuses the store exactly as one process does (`plan.prepare_store`).
  Every rank gets its decision: the same error, "nothing to do", or the store's layout (the features' byte
  offset, shape, dtype) and the rows still to extract. The other ranks never open the file with h5py, so
  HDF5's lock on it stays rank 0's.
- The rows to extract are cut into one contiguous share per rank (`Dist.part`): a deterministic split of
  the same list, so a resumed run shares what is left of it.
- Each rank writes its features straight into the one preallocated, contiguous `features` dataset, at the
  dataset's byte offset in the file (`os.pwrite`): disjoint row ranges, so disjoint bytes, and no lock.
  Byte-range writes rather than a writable memory map: the dataset's offset is not page-aligned, so two
  neighbouring rows share a page, and on a network filesystem a node writing back a whole mapped page can
  overwrite the bytes another node wrote into the other half of it; a byte-range write never touches bytes
  outside its rows. It also works where shared writable maps do not (FUSE mounts).
- Statuses are rank 0's to write, through `store.Writer`. Every `round_rows` rows, every rank syncs
  (fdatasync) the features it wrote, then the (row, status) pairs of that round are gathered (padded
  tensors) to rank 0, which commits them. A status never vouches for features that are not on disk, and a
  killed run resumes row by row, as a single process does.

Why not part files that rank 0 merges: the merge is a second full copy of the features (25 GB for COCO,
more for Conceptual Captions) written after the ranks finish, with twice the disk space needed meanwhile,
and a run killed during it resumes nothing. Here the store is filled in place, once, and stays one
memory-mappable dataset. The limit: every rank must see the same file, so on several machines the store
must be on a shared filesystem (NFS, Lustre, GPFS...). A copy per node works for fit, not for extract.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.distributed import Dist
from pipeline.errors import UserError, describe
from pipeline.extract.encode import RowWriter
from pipeline.store import Writer, open_file

# Rows per rank between two status rounds: at most that much work is redone after a kill. Each round costs an
# fdatasync of the rows' features (~200 KB an image in float16) and a small gather: on a GPU at ~1,000
# images/s per rank, about one round a second; on a CPU (~10 images/s a rank) one every ~15 s.
ROUND_ROWS = {"cuda": 1024, "cpu": 128}


@dataclass(frozen=True)
class Layout:
    """Where the features dataset lies in the file: rank 0 reads it, every rank gets it."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


def read_layout(path: Path) -> Layout:
    """Rank 0: the byte offset, shape and dtype of the store's features (contiguous, as extract makes them)."""
    with open_file(path, "r") as f:
        ds = f["features"]
        offset = ds.id.get_offset()
        if offset is None or ds.chunks is not None or ds.compression is not None:
            raise UserError(f"{path}: features are not stored contiguously; cannot write them in place")
        return Layout(int(offset), tuple(ds.shape), ds.dtype.name)


def writer_for(dist: Dist, path: Path, rows: np.ndarray) -> Callable[[], RowWriter]:
    """What this process writes its share of `rows` through: store.Writer in one process; under torchrun a
    ShareWriter, with the layout rank 0 reads and as many status rounds as the largest share needs."""
    if not dist.enabled:
        return partial(Writer, path)
    layout = dist.decide(lambda: read_layout(path))
    largest = max(len(part) for part in np.array_split(rows, dist.world))
    rounds = ROUND_ROWS[dist.device.type]
    return lambda: ShareWriter(dist, path, layout, largest, rounds)


class ShareWriter:
    """The writer `encode.extract_rows` fills (store.Writer's `write(rows, features, status)`, `finish`,
    `close`), for one rank: features written in place at their bytes, statuses through rank 0 in rounds (see
    the module's docstring). Every rank takes part in the same number of rounds, the number the largest share
    needs, so that the collectives pair up."""

    def __init__(self, dist: Dist, path: Path, layout: Layout, largest_share: int, round_rows: int) -> None:
        self.dist, self.path, self.layout, self.round_rows = dist, Path(path), layout, round_rows
        self.rounds = -(-largest_share // round_rows)
        self.row_bytes = int(np.prod(layout.shape[1:])) * np.dtype(layout.dtype).itemsize
        with self._errors():
            self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))  # never O_TRUNC: rank 0's store
        # statuses, counts and the completion marker: rank 0's, committed by rounds (never by time)
        self.writer = Writer(self.path, sync_seconds=math.inf) if dist.is_main else None
        self.done = 0  # rounds done
        self.rows = 0  # rows handed to write()
        self.unmarked: list[np.ndarray] = []  # (k, 2) row, status: written, not yet marked

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:  # a full disk, EFBIG...: this rank's error line; torchrun stops the others
            reason = os.strerror(e.errno) if e.errno else describe(e)
            raise UserError(f"cannot write {self.path}: {reason}") from None

    def write(self, rows: np.ndarray, features: np.ndarray | None, status: int) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if features is not None and len(rows):
            if features.shape[1:] != self.layout.shape[1:] or features.dtype != np.dtype(self.layout.dtype):
                raise ValueError(f"features {features.dtype}{features.shape} do not fit the store's rows")
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            with self._errors():
                for run, feats in zip(np.split(rows, breaks), np.split(features, breaks), strict=True):
                    self._pwrite(np.ascontiguousarray(feats), self.layout.offset + int(run[0]) * self.row_bytes)
        self.unmarked.append(np.stack([rows, np.full_like(rows, status)], axis=1))
        self.rows += len(rows)
        while self.done < self.rounds and self.rows >= (self.done + 1) * self.round_rows:
            self._round()

    def _pwrite(self, block: np.ndarray, offset: int) -> None:
        view = memoryview(block).cast("B")
        while len(view):
            if hasattr(os, "pwrite"):
                n = os.pwrite(self.fd, view, offset)
            else:  # Windows
                os.lseek(self.fd, offset, os.SEEK_SET)
                n = os.write(self.fd, view)
            view, offset = view[n:], offset + n

    def _sync(self) -> None:
        with self._errors():
            getattr(os, "fdatasync", os.fsync)(self.fd)  # the features on disk before a status vouches for them

    def _take(self) -> np.ndarray:
        mine = np.concatenate(self.unmarked) if self.unmarked else np.zeros((0, 2), dtype=np.int64)
        self.unmarked = []
        return mine

    def _mark(self, marks: np.ndarray) -> None:
        """Rank 0: commit the statuses of `marks` (row, status) through store.Writer."""
        assert self.writer is not None
        for value in np.unique(marks[:, 1]):
            self.writer.write(marks[marks[:, 1] == value, 0], None, int(value))
        self.writer.commit()

    def _round(self) -> None:
        self._sync()
        marks = self.dist.gather_rows(self._take())  # every rank's (row, status) pairs of this round
        if self.writer is not None and len(marks):
            self._mark(marks)
        self.done += 1

    def finish(self) -> dict:
        """The remaining rounds (a smaller share ends first and waits here for the others), then rank 0
        records the counts and the completion marker. Returns the counts, on every rank."""
        while self.done < self.rounds:
            self._round()
        if len(self._take()):
            raise RuntimeError("rows written after the last status round")  # the round count is wrong
        return self.dist.broadcast(self.writer.finish() if self.writer is not None else None)

    def close(self) -> None:
        """On the way out of an error, rank 0 still marks its own written rows (synced first); the other ranks'
        unmarked rows are redone by the next run."""
        try:
            if self.writer is not None:
                mine = self._take()
                with contextlib.suppress(UserError):  # the error on its way out says it better
                    if len(mine):
                        self._sync()
                        self._mark(mine)
                self.writer.close()
        finally:
            os.close(self.fd)
