"""`extract` under torchrun: the ranks share the images and fill one store, the same file a single process
makes (same `images` order, same features within float tolerance, same statuses).

How the work is shared:

- Rank 0 alone decides what the store is: it takes the store's one-writer lock for the whole run, and
  creates, resumes or refuses the store exactly as one process does (`extract._prepare_store`). Every rank
  gets its decision: the same error, "nothing to do", or the store's layout (the features' byte offset,
  shape, dtype) and the rows still to extract.
- The rows to extract are cut into one contiguous share per rank (`Dist.part`): a deterministic split of
  the same list, so a resumed run shares what is left of it.
- Each rank writes its features straight into the one preallocated, contiguous `features` dataset, at the
  dataset's byte offset in the file (`os.pwrite`): disjoint row ranges, so disjoint bytes, and no lock.
  Byte-range writes rather than a writable memory map: the dataset's offset is not page-aligned, so two
  neighbouring rows share a page, and on a network filesystem a node writing back a whole mapped page can
  overwrite the bytes another node wrote into the other half of it; a byte-range write never touches bytes
  outside its rows. It also works where shared writable maps do not (FUSE mounts).
- Statuses are rank 0's to write. Every `round_rows` rows, every rank syncs (fdatasync) the features it
  wrote, then the (row, status) pairs of that round are gathered (padded tensors) to rank 0, which writes
  them into `status` and flushes the file. A status never vouches for features that are not on disk, and a
  killed run resumes row by row, as a single process does.

Why not part files that rank 0 merges: the merge is a second full copy of the features (25 GB for COCO,
more for Conceptual Captions) written after the ranks finish, with twice the disk space needed meanwhile,
and a run killed during it resumes nothing. Here the store is filled in place, once, and stays one
memory-mappable dataset. The limit: every rank must see the same file, so on several machines the store
must be on a shared filesystem (NFS, Lustre, GPFS...). A copy per node works for fit, not for extract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline import store as st
from pipeline.console import info, warn
from pipeline.datasets import CaptionSet, read_captions
from pipeline.distributed import Dist, session
from pipeline.encoder import build_encoder
from pipeline.errors import UserError
from pipeline.extract import ExtractConfig, _prepare_store, _run, provenance
from pipeline.files import exclusive

# Rows per rank between two status rounds: at most that much work is redone after a kill. Each round costs an
# fdatasync of the rows' features (~200 KB an image in float16) and a small gather: on a GPU at ~1,000
# images/s per rank, about one round a second; on a CPU (~10 images/s a rank) one every ~15 s.
ROUND_ROWS = {"cuda": 1024, "cpu": 128}


@dataclass(frozen=True)
class Layout:
    """Where the features dataset lies in the file, and what is left to extract: rank 0 reads it, every
    rank gets it (the other ranks never open the file with h5py, so HDF5's lock is rank 0's alone)."""

    offset: int
    shape: tuple[int, ...]
    dtype: str
    rows: np.ndarray  # rows still pending, in order


def extract(cfg: ExtractConfig) -> dict:
    """`pipeline.extract.extract` for one rank of a torchrun job. Returns the run's summary (the same on
    every rank)."""
    start = time.perf_counter()
    with session(cfg.device) as dist, contextlib.ExitStack() as held:
        dist.check(lambda: _check_options(cfg))
        captions = dist.check(lambda: _read_captions(cfg, dist))
        # rank 0 of each node first: an ImageNet download then happens once per node
        built = dist.check(lambda: build_encoder(cfg.weights) if dist.local_rank == 0 else None)
        trunk, weights = dist.check(lambda: built or build_encoder(cfg.weights))
        prov = provenance(weights.to_dict(), cfg.transform, cfg.dtype)
        summary = {"store": str(cfg.store), "images": len(captions), "captions": sum(map(len, captions.captions))}
        layout = dist.decide(lambda: _open_store(cfg, captions, prov, held))
        if layout is None:
            return summary | {"written_now": 0, "skipped_now": 0, "seconds": time.perf_counter() - start}
        mine = dist.part(layout.rows)
        info(f"extract: {len(layout.rows)} images over {dist.world} processes ({len(mine)} on rank 0)")
        shares = [len(part) for part in np.array_split(layout.rows, dist.world)]
        writer = ShareWriter(dist, cfg.store, layout, max(shares), ROUND_ROWS[dist.device.type])
        try:
            written, skipped = _run(_per_rank(cfg, dist), trunk, dist.device, captions, mine, writer)
            counts = writer.finish()
        finally:
            writer.close()
        written, skipped = dist.sum(written, skipped)
        dist.check(lambda: _check_written(cfg, counts))  # the same counts on every rank: rank 0 reports
        seconds = time.perf_counter() - start
        size = cfg.store.stat().st_size if dist.is_main else 0
        summary |= counts | {"written_now": int(written), "skipped_now": int(skipped), "seconds": seconds}
        info(
            f"done: {counts['images_written']} images written, {counts['images_skipped']} skipped (undecodable), "
            f"{summary['captions']} captions, {size / 2**30:.2f} GiB at {cfg.store}, "
            f"{int(written)} this run by {dist.world} processes in {seconds:.1f}s"
        )
        return summary | ({"bytes": size} if dist.is_main else {})


def _check_written(cfg: ExtractConfig, counts: dict) -> None:
    if counts["images_written"] == 0:
        raise UserError(f"no image under {cfg.images} could be decoded; nothing was extracted")


def _check_options(cfg: ExtractConfig) -> None:
    # the checks `extract.extract` makes first, made here on every rank and agreed
    if cfg.dtype not in st.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(st.DTYPES)}, not {cfg.dtype!r}")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")


def _read_captions(cfg: ExtractConfig, dist: Dist) -> CaptionSet:
    """Every rank reads the captions (it needs the image names of its share); rank 0 reports on them."""
    captions = read_captions(cfg.images, cfg.captions)
    if dist.is_main:
        info(f"captions: {captions.source} ({captions.layout}), {len(captions)} images on disk")
        for reason, count in sorted(captions.problems.items()):
            if count:
                warn(f"{count} {reason}")
    if not captions.images:
        raise UserError(f"none of the captioned images were found under {cfg.images}")
    return captions


def _open_store(cfg: ExtractConfig, captions: CaptionSet, prov: dict, held: contextlib.ExitStack) -> Layout | None:
    """Rank 0: take the store's lock (held until the run ends), create, resume or refuse the store as one
    process does; None when it is complete."""
    held.enter_context(exclusive(cfg.store, str(cfg.store)))
    if _prepare_store(cfg, captions, prov):
        return None
    with h5py.File(cfg.store, "r") as f:
        ds = f["features"]
        offset = ds.id.get_offset()
        if offset is None or ds.chunks is not None or ds.compression is not None:
            raise UserError(f"{cfg.store}: features are not stored contiguously; cannot write them in place")
        rows = np.flatnonzero(f["status"][:] == st.PENDING)
        return Layout(int(offset), tuple(ds.shape), ds.dtype.name, rows)


def _per_rank(cfg: ExtractConfig, dist: Dist) -> ExtractConfig:
    """Decoding workers per rank: the node's cores shared by its ranks (runtime.default_workers' rule)."""
    if cfg.workers is not None:
        return cfg
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // dist.local_world
    return dataclasses.replace(cfg, workers=0 if share <= 2 else min(16, share - 1))


class ShareWriter:
    """The writer `extract._run` fills (`write(rows, features, status)`), for one rank: features written in
    place at their bytes, statuses through rank 0 in rounds (see the module's docstring). Every rank takes
    part in the same number of rounds, the number the largest share needs, so that the collectives pair up."""

    def __init__(self, dist: Dist, path: os.PathLike, layout: Layout, largest_share: int, round_rows: int) -> None:
        self.dist, self.path, self.round_rows, self.layout = dist, path, round_rows, layout
        self.rounds = -(-largest_share // round_rows)
        self.row_bytes = int(np.prod(layout.shape[1:])) * np.dtype(layout.dtype).itemsize
        self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))  # never O_TRUNC: rank 0's store
        self.file = h5py.File(path, "r+") if dist.is_main else None  # statuses and attributes: rank 0's
        self.done = 0  # rounds done
        self.rows = 0  # rows handed to write()
        self.unmarked: list[np.ndarray] = []  # (k, 2) row, status: written, not yet marked

    def write(self, rows: np.ndarray, features: np.ndarray | None, status: int) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if features is not None and len(rows):
            if features.shape[1:] != self.layout.shape[1:] or features.dtype != np.dtype(self.layout.dtype):
                raise ValueError(f"features {features.dtype}{features.shape} do not fit the store's rows")
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
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

    def _round(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self.fd)  # these features are on disk before any status vouches for them
        mine = np.concatenate(self.unmarked) if self.unmarked else np.zeros((0, 2), dtype=np.int64)
        self.unmarked = []
        marks = self.dist.gather_rows(mine)  # every rank's (row, status) pairs of this round
        if self.file is not None and len(marks):
            status = self.file["status"][:]
            status[marks[:, 0]] = marks[:, 1]
            lo, hi = int(marks[:, 0].min()), int(marks[:, 0].max()) + 1
            self.file["status"][lo:hi] = status[lo:hi]  # one write; rows in between keep their values
            self.file.flush()
        self.done += 1

    def finish(self) -> dict:
        """The remaining rounds (a smaller share ends first and waits here for the others), then rank 0
        records the counts and the completion marker. Returns the counts, on every rank."""
        while self.done < self.rounds:
            self._round()
        if self.unmarked and any(len(m) for m in self.unmarked):
            raise RuntimeError("rows written after the last status round")  # the round count is wrong
        counts = None
        if self.file is not None:
            status = self.file["status"][:]
            counts = {
                "images_written": int((status == st.WRITTEN).sum()),
                "images_skipped": int((status == st.SKIPPED).sum()),
            }
            for k, v in counts.items():
                self.file.attrs[k] = v
            self.file.attrs["complete"] = bool((status != st.PENDING).all())
            self.file.flush()
        return self.dist.broadcast(counts)

    def close(self) -> None:
        os.close(self.fd)
        if self.file is not None:
            self.file.close()
