"""A fit run's folder, OUT (timm's CheckpointSaver role): which files it holds (`RunFiles`), claiming it for a
run (the lock, and the refusal of an earlier run's files), saving an epoch, and what --resume reads back.

`OUT/metrics.jsonl` holds one JSON object per epoch. The whole file is rewritten atomically after each epoch (a
few kilobytes even after hundreds of epochs), so that it always parses, whenever the run is killed. A number
that is not finite (the validation loss of a store without validation images, a diverged loss) is written as
null: strict JSON has no NaN.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.figures import training_curves
from pipeline.files import check_writable_folder, exclusive, remove_stale_temps, write_text_atomic
from pipeline.train.state import Best, TrainingData, TrainingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """What fit writes in OUT."""

    out: Path

    @property
    def model(self) -> Path:
        return self.out / "model.pt"

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.out / "curves.png"

    def all(self) -> tuple[Path, ...]:
        return self.last, self.model, self.metrics, self.curves


def claim(files: RunFiles, resume: bool, hold: contextlib.ExitStack) -> dict | None:
    """Rank 0: OUT writable, its lock held (in `hold`: for the whole run), temps of killed runs removed, then
    last.pt (`resume`) or the refusal of an earlier run's files."""
    check_writable_folder(files.out, "--out")
    hold.enter_context(exclusive(files.out, f"--out {files.out}"))
    for path in files.all():
        remove_stale_temps(path, locked=True)  # left by a run killed with -9 while writing
    return _load_last(files) if resume else _refuse_earlier_run(files)


def _load_last(files: RunFiles) -> dict:
    if not files.last.exists():
        raise UserError(
            f"--resume: there is no {files.last} (no epoch of a run in {files.out} has finished yet): "
            "run the same command without --resume to start"
        )
    return checkpoint.load(files.last, resume=True)


def _refuse_earlier_run(files: RunFiles) -> None:
    """A new run must not overwrite or mix with an earlier run's files."""
    if files.last.exists():
        try:
            done = checkpoint.load(files.last).get("epoch", "?")
        except UserError:
            done = "an unreadable checkpoint of"
        raise UserError(
            f"{files.last} holds an earlier run ({done} epochs): pass --resume to continue it, "
            "or --out DIR to start a new one elsewhere"
        )
    found = [p.name for p in files.all() if p.exists()]
    if found:
        raise UserError(
            f"{files.out} already holds {', '.join(found)} of another run (and no last.pt to resume from): "
            "pass --out DIR to start a new run elsewhere, or move those files away"
        )


class EpochWriter:
    """The files of each epoch written off the training thread, in the order `save_epoch` gives: last.pt, model.pt,
    metrics.jsonl, curves.png (timm's CheckpointSaver runs in the training thread; here a 144 MB last.pt took
    ~0.5 s and matplotlib ~0.25 s an epoch, half of a GPU epoch at a large batch). One epoch's files at a time:
    `submit` first waits for the previous epoch's, and raises its error (a full disk) as the training thread's
    own; `close` waits for the last, so once fit returns or stops, every file is whole. Each file is replaced
    atomically, as before: a kill during a write leaves the previous epoch's file. Ctrl-C while the training
    thread waits for a write lets the write finish, then stops (a second Ctrl-C waits too: a save takes a
    second at most)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-files")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        interrupted = False
        while True:
            try:
                pending.result()
                break
            except KeyboardInterrupt:  # raised in this thread by the signal, not by the write
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def save_epoch(
    files: RunFiles,
    state: TrainingState,
    data: TrainingData,
    cfg: TrainConfig,
    is_best: bool,
    writer: EpochWriter | None = None,
) -> None:
    """The run's files after an epoch, each replaced atomically, last.pt first: from the moment it is saved the
    run resumes from this epoch, and a resume completes whatever a kill left unwritten after it. With a
    `writer`, a copy of the model and optimizer state is taken here and the files are written by its thread."""
    extra = checkpoint.finetune_state(state.model) if cfg.finetune is not None else None
    ckpt = checkpoint.model_state(
        state.model.decoder,
        data.vocab,
        cfg.to_dict(),
        data.store,
        state.epoch,
        state.best.to_dict(),
        state.records[-1],
        extra,
    )
    last = ckpt | checkpoint.training_state(state.optimizer, state.scheduler, state.records)
    records = [dict(r) for r in state.records]

    def write(last: dict = last, ckpt: dict = ckpt) -> None:
        checkpoint.save(last, files.last)
        if is_best:
            checkpoint.save(ckpt, files.model)
        write_history(files.metrics, records)
        training_curves(records, files.curves)

    if writer is None:
        write()
    else:  # the next step changes the weights and Adam's moments in place: the thread writes a copy
        copy = _copied(last)
        writer.submit(functools.partial(write, copy, {k: copy[k] for k in ckpt}))


def _copied(value: object) -> object:
    """`value` with every tensor copied to the CPU (the training state of one epoch, frozen for the writer)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def resumed_history(ckpt: dict, files: RunFiles) -> list[dict]:
    """The metrics of the epochs last.pt holds: its own copy (metrics.jsonl may hold a line of an epoch
    written after it, before a kill), or for a last.pt without one, metrics.jsonl cut at its epoch."""
    found = ckpt["history"] if isinstance(ckpt.get("history"), list) else read_history(files.metrics)
    return [r for r in found if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= ckpt["epoch"]]


def complete_files(ckpt: dict, best: Best, files: RunFiles) -> None:
    """Finish the writes that a kill interrupted after last.pt was saved: model.pt of that epoch when it was
    the best, metrics.jsonl and curves.png as of that epoch."""
    if best.epoch == ckpt["epoch"] and _saved_epoch(files.model) != best.epoch:
        checkpoint.save(checkpoint.model_only(ckpt), files.model)
    records = resumed_history(ckpt, files)
    if write_history(files.metrics, records) or (records and not files.curves.exists()):
        training_curves(records, files.curves)


def _saved_epoch(path: Path) -> int | None:
    try:
        return checkpoint.load(path)["epoch"]
    except UserError:
        return None


def read_history(path: Path) -> list[dict]:
    """The records in `path` ([] when it does not exist); an unreadable line is dropped with a warning."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            log.warning(f"{path}: dropped an unreadable line")
    return records


def write_history(path: Path, records: list[dict]) -> bool:
    """Replace the file with `records` (atomically), unless it holds them already. True when written."""
    text = "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True


def _finite(record: dict) -> dict:
    """NaN and infinities as null: strict JSON has no NaN (no validation images, a diverged loss)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
