"""Training batches from the store: one indexed read of the memory map per batch, prefetched in a thread.

An epoch is one pass over the training images; each image brings `captions_per_image` of its captions,
drawn afresh every epoch from a generator seeded by (seed, epoch) alone, so that a resumed run sees
exactly the batches an uninterrupted one would. The image's feature row is read once for all of them.

Rows are read as stored: (7, 7, 2048) from a layer4 store, (14, 14, 1024) from a layer3 one (layer4 then runs
on the device, in the model: pipeline.model.CaptionModel).
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.vocab import Vocabulary

# Validation loss batches: 64 images x 5 captions keep the logits near 300 MB at an 18k-word vocabulary.
VALIDATION_BATCH_IMAGES = 64
VALIDATION_CAPTIONS = 5


@dataclass
class CaptionIndex:
    """Encoded captions grouped by image row (CSR): captions of row r are ids[start[r]:start[r]+count[r]],
    and texts[start[r]:start[r]+count[r]] are the same captions as written."""

    ids: np.ndarray  # (M, L) int32, sorted by image row
    start: np.ndarray  # (N,) int64
    count: np.ndarray  # (N,) int64
    texts: list[str]  # (M,) the captions as written, in the order of `ids`

    @classmethod
    def build(
        cls, vocab: Vocabulary, texts: list[str], caption_rows: np.ndarray, n_rows: int, max_len: int
    ) -> CaptionIndex:
        """`texts[i]` describes store row `caption_rows[i]` (the store's captions/text and captions/image)."""
        order = np.argsort(caption_rows, kind="stable")
        ordered = [texts[i] for i in order]
        ids, _ = vocab.encode_batch(ordered, max_len)
        count = np.bincount(caption_rows, minlength=n_rows).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        return cls(ids, start, count, ordered)

    def references(self, rows: np.ndarray) -> list[list[str]]:
        """The caption texts of each row: what evaluation scores a generated caption against."""
        return [self.texts[self.start[r] : self.start[r] + self.count[r]] for r in rows]

    def pick(self, rows: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
        """(len(rows), k) caption indices: k distinct captions per image when it has k, else repeats.
        With rng=None the choice is fixed (the first k, cycling): used for validation."""
        counts = self.count[rows]
        if rng is None:
            slot = np.arange(k)[None, :] % counts[:, None]
        else:
            width = int(counts.max())
            keys = rng.random((len(rows), width))
            keys[np.arange(width)[None, :] >= counts[:, None]] = np.inf  # slots past the image's captions
            slot = np.argsort(keys, axis=1)[:, :k] % counts[:, None]
            if k > width:
                slot = np.concatenate([slot, rng.integers(0, 1 << 30, (len(rows), k - width)) % counts[:, None]], 1)
        return self.start[rows][:, None] + slot


@dataclass
class Batch:
    features: torch.Tensor  # (B, h, w, C) as stored (7x7x2048 or 14x14x1024), store dtype, on the device
    tokens: torch.Tensor  # (B, G, T+1) int64 ids, trimmed to the longest caption in the batch
    rows: np.ndarray  # (B,) store rows
    # The loss weight of this batch (loss.CaptionTraining): 1 in one process; under torchrun, the number of
    # processes x this process's share of the step's target tokens.
    weight: float = 1.0


class FeatureRows(Protocol):
    """What `Batches` reads features from: a FeatureStore, or a stand-in holding the same rows in RAM."""

    @property
    def features(self) -> np.ndarray: ...  # (N, h, w, C), a memory map or an array

    def __len__(self) -> int: ...

    def prefetch(self, rows: np.ndarray) -> None: ...  # a hint that these rows are read next


class Batches:
    """Iterates training or validation batches; features from the memory map, or from a copy resident
    on the device when one was made (`make_resident`).

    Under torchrun, each of the `world` processes makes its own Batches with its `rank`: every process draws
    the same permutation of the epoch (from (seed, epoch) alone) and cuts it into global batches of
    batch_size x world images, exactly as one process with that batch size cuts it; process `rank` takes
    images rank, rank + world, ... of each global batch. The shares are disjoint and together cover the
    epoch, and every process runs the same number of steps (DDP needs that): a last global batch with fewer
    images than processes joins the one before it (the other global batches are full, the last one of at
    least `world` images may be smaller). One process (world 1) cuts the epoch as it always did."""

    def __init__(
        self,
        store: FeatureRows,
        captions: CaptionIndex,
        rows: np.ndarray,
        batch_size: int,
        captions_per_image: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.store, self.captions, self.rows = store, captions, np.asarray(rows)
        self.batch_size, self.captions_per_image, self.device = batch_size, captions_per_image, device
        if not 0 <= rank < world or (world > 1 and len(self.rows) < world):
            raise ValueError(f"{len(self.rows)} images cannot be shared by {world} processes (rank {rank})")
        self.rank, self.world = rank, world
        self.resident: torch.Tensor | None = None  # features of self.rows, in self.rows order
        self._position: np.ndarray | None = None  # store row -> index into resident

    def __len__(self) -> int:
        return len(self._bounds())

    def _bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each global batch in the epoch's order of images."""
        n, step = len(self.rows), self.batch_size * self.world
        starts = list(range(0, n, step))
        if not starts:
            return []
        if len(starts) > 1 and n - starts[-1] < self.world:
            starts.pop()  # too few images for one per process: they join the global batch before
        return list(zip(starts, [*starts[1:], n], strict=True))

    def make_resident(self, chunk: int = 1024) -> None:
        """Copy these rows' features to the device once; batches are then gathered there."""
        feats = self.store.features
        dtype = torch.from_numpy(np.empty(0, feats.dtype)).dtype  # not feats[:1]: a read-only map, torch warns
        out = torch.empty((len(self.rows), *feats.shape[1:]), dtype=dtype, device=self.device)
        for i in range(0, len(self.rows), chunk):
            block = torch.from_numpy(np.ascontiguousarray(feats[np.sort(self.rows[i : i + chunk])]))
            order = np.argsort(np.argsort(self.rows[i : i + chunk]))  # back from sorted to self.rows order
            out[i : i + len(block)] = block[torch.from_numpy(order)].to(self.device)
        self.resident = out
        self._position = np.full(len(self.store), -1, dtype=np.int64)
        self._position[self.rows] = np.arange(len(self.rows))

    def plan(self, epoch: int | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This process's batches of the epoch as (image rows, caption indices). epoch=None: fixed order,
        fixed captions."""
        return [(rows, picks) for rows, picks, _ in self._steps(epoch, seed)]

    def _steps(self, epoch: int | None, seed: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """plan() with each batch's loss weight (Batch.weight)."""
        if epoch is None:
            rows, rng = self.rows, None
        else:
            rng = np.random.default_rng([seed, epoch])
            rows = self.rows[rng.permutation(len(self.rows))]
        picks = self.captions.pick(rows, self.captions_per_image, rng)
        out = []
        for start, end in self._bounds():
            r, p = rows[start:end], picks[start:end]
            weight = 1.0
            if self.world > 1:
                tokens = self._targets(p)  # (global batch,) target tokens of each image's captions
                r, p = r[self.rank :: self.world], p[self.rank :: self.world]
                weight = self.world * float(tokens[self.rank :: self.world].sum()) / float(tokens.sum())
            order = np.argsort(r, kind="stable")  # ascending rows: the memory map is read front to back
            out.append((r[order], p[order], weight))
        return out

    def _targets(self, picks: np.ndarray) -> np.ndarray:
        """Target tokens (the loss's non-<pad> positions: every id after <start>) of each image's picked
        captions."""
        return (self.captions.ids[picks] != 0).sum(axis=(-2, -1)) - picks.shape[-1]

    def _load(self, rows: np.ndarray, picks: np.ndarray, weight: float = 1.0) -> Batch:
        ids = self.captions.ids[picks]  # (B, G, L)
        longest = int((ids != 0).sum(-1).max())
        tokens = torch.from_numpy(ids[..., :longest].astype(np.int64))
        if self.resident is not None:
            index = torch.from_numpy(self._position[rows]).to(self.device, non_blocking=True)
            feats = self.resident.index_select(0, index)
        else:
            self.store.prefetch(rows)  # all rows requested from disk at once, not faulted in one by one
            feats = torch.from_numpy(self.store.features[rows])  # one fancy-indexed read of the map
            if self.device.type == "cuda":
                feats = feats.pin_memory()
        features, tokens = feats.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True)
        return Batch(features, tokens, rows, weight)

    def iterate(self, epoch: int | None, seed: int, prefetch: int = 4) -> Iterator[Batch]:
        plan = self._steps(epoch, seed)
        if self.resident is not None:
            for rows, picks, weight in plan:
                yield self._load(rows, picks, weight)
            return
        yield from _background((self._load(*step) for step in plan), prefetch)


def validation_batches(
    store: FeatureRows,
    captions: CaptionIndex,
    rows: np.ndarray,
    device: torch.device,
    batch_size: int = VALIDATION_BATCH_IMAGES,
) -> Batches:
    """The fixed validation captions of `rows` (the first VALIDATION_CAPTIONS of each image, in row order)
    for `loss.validation_loss`, in batches of at least VALIDATION_BATCH_IMAGES images."""
    return Batches(store, captions, rows, max(batch_size, VALIDATION_BATCH_IMAGES), VALIDATION_CAPTIONS, device)


STD_FLOOR = 0.1  # of the median channel's deviation: see feature_stats


@dataclass(frozen=True)
class FeatureStats:
    """Per-channel statistics of the features the decoder reads, over the training rows: what fit normalises
    with (DecoderConfig.feature_norm, feature_scale)."""

    mean: torch.Tensor  # (D,) float32
    std: torch.Tensor  # (D,) float32, floored (see feature_stats)
    rms: float  # of all the values: 1/rms is the single scale of `--feature-norm rms`
    cell_mean: torch.Tensor | None = None  # (cells, D) float32: each grid cell's own mean (`--init-from-grid`)


def feature_stats(
    features: np.ndarray,
    rows: np.ndarray,
    sample: int = 1024,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> FeatureStats:
    """Mean, standard deviation and RMS of each channel over every grid cell of (up to) `sample` rows evenly
    spaced over `rows` (fit passes the train split's: nothing of the val or test images leaks into the model),
    and each cell's own mean of each channel,
    read `batch_size` rows at a time and summed in float64. `encode`: what the decoder reads is not the stored
    rows but encode(rows) (layer4 run on a layer3 store's rows).

    A channel that hardly varies over the training images (a ReLU output that is almost always 0: 48 of a random
    ResNet50's 2,048 on the demo) would be blown up by its tiny deviation the moment it varies, on a new photo or
    in a layer4 being fine-tuned (measured: `demo --finetune` then learned nothing, its loss flat at the language
    prior): deviations are floored at a tenth of the median channel's, so no channel is amplified more than ten
    times the typical one."""
    pick = np.unique(rows[np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(int)])
    total = square = cells = None
    count = 0
    with torch.no_grad():
        for i in range(0, len(pick), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(features[pick[i : i + batch_size]]))
            x = (encode(x) if encode is not None else x).double()
            per_cell = x.reshape(x.shape[0], -1, x.shape[-1]).sum(0)  # (cells, D)
            cells = per_cell if cells is None else cells + per_cell
            x = x.reshape(-1, x.shape[-1])  # (rows x cells, D)
            total = x.sum(0) if total is None else total + x.sum(0)
            square = x.square().sum(0) if square is None else square + x.square().sum(0)
            count += x.shape[0]
    if total is None:
        raise ValueError("no rows to compute feature statistics from")
    mean = total / count
    var = (square / count - mean.square()).clamp_min(0)
    std = var.sqrt()
    floor = STD_FLOOR * float(std.median()) if float(std.median()) > 0 else 1e-6
    rms = float((square.sum() / (count * len(mean))).sqrt())
    cell_mean = (cells * cells.shape[0] / count).float()  # count = rows x cells
    return FeatureStats(mean.float(), std.clamp_min(floor).float(), rms, cell_mean)


def feature_scale(
    features: np.ndarray,
    rows: np.ndarray,
    sample: int = 256,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 32,
) -> float:
    """1 / RMS of (up to) `sample` rows' features, evenly spaced over `rows` (`--feature-norm rms`, fit's
    default before per-channel statistics, and what the benchmarks scale random features with)."""
    rms = feature_stats(features, rows, sample, encode, batch_size).rms
    return 1.0 / rms if rms > 0 else 1.0


_RUNNING: set[tuple[threading.Event, threading.Thread]] = set()  # the live _background threads


@atexit.register
def _stop_background() -> None:
    """Stop the prefetch threads before the interpreter's finalisation. A generator left open by an exception
    (Ctrl-C in the middle of an epoch: the traceback holds its frame, so its `finally` has not run) leaves its
    daemon thread running; finalisation freezes a daemon thread wherever it is, and if that is inside h5py
    (an h5py object freed by a garbage collection that ran on that thread) it holds h5py's global lock, and the
    main thread, freeing its own h5py objects, waits for it forever: fit hung after Ctrl-C, rarely."""
    for stop, thread in list(_RUNNING):
        stop.set()
        thread.join(timeout=5)


def _background(items: Iterator, depth: int) -> Iterator:
    """Run a generator in a thread, `depth` items ahead (numpy's gathers release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=work, name="batches-prefetch", daemon=True)
    running = (stop, thread)
    _RUNNING.add(running)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
        _RUNNING.discard(running)
