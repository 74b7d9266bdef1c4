"""The recipe: `fit`, the loop over the epochs (`run_epochs`), the module each epoch trains (`Phases`: cross-entropy,
then SCST), and one cross-entropy epoch (`train_epoch`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.console import progress
from pipeline.data import Batches
from pipeline.distributed import Dist, session
from pipeline.errors import UserError
from pipeline.loss import CaptionTraining
from pipeline.model import CaptionModel, compile_cell, count_parameters
from pipeline.scst import Rewards, SelfCriticalTraining, collapsing, scst_epoch
from pipeline.store import FeatureStore
from pipeline.train.run_folder import EpochWriter, RunFiles, claim, complete_files, resumed_history, save_epoch
from pipeline.train.setup import (
    check_finetune,
    check_resumable,
    fits_on_gpu,
    open_store,
    prepare,
    resume,
    resume_config,
    start,
)
from pipeline.train.state import TrainingData, TrainingState
from pipeline.train.step import rate_factor, scaled_rates, train_step
from pipeline.train.validation import validate, validation_set

log = logging.getLogger(__name__)


def train_epoch(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    epoch: int,
    cfg: TrainConfig,
    dist: Dist | None = None,
) -> dict:
    """One pass over the training images: train_loss (mean over steps of the step's loss), seconds (the pass
    alone) and samples_per_second (captions, of all the ranks)."""
    dist = dist or Dist()
    module.train()
    device = batches.device
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per batch
    samples = 0
    with progress(len(batches), f"epoch {epoch}/{cfg.epochs}", unit="batch") as advance:
        first = (epoch - 1) * len(batches)  # steps before this epoch (warm-up and schedule count over the run)
        total = cfg.xe_epochs * len(batches)
        for i, batch in enumerate(batches.iterate(epoch, cfg.seed)):
            with scaled_rates(optimizer, rate_factor(first + i, total, cfg.warmup_steps, cfg.lr_schedule)):
                loss_sum += train_step(module, optimizer, batch, cfg)
            samples += batch.tokens.shape[0] * batch.tokens.shape[1]
            advance(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    # Under torchrun each rank's losses carry its token share x world: their sum over the ranks, over world,
    # is the step's loss. One process: the sum and the count as they are.
    total, samples = dist.sum(float(loss_sum), samples)
    record = {"train_loss": total / (len(batches) * dist.world), "seconds": seconds}
    record["samples_per_second"] = samples / seconds
    if dist.enabled:
        record["processes"] = dist.world
    return record


def fit(cfg: TrainConfig) -> dict:
    """Train for `cfg.epochs` epochs in total (resumed epochs included). After each epoch: OUT/last.pt,
    OUT/model.pt when the epoch is the best so far, OUT/metrics.jsonl, OUT/curves.png. Returns the last
    epoch's metrics ({} when last.pt already had every epoch).

    Everything that can be checked is checked before the first step: the settings, the store, that OUT can
    be written, that no other process writes it (the lock), and that it holds no other run's files.
    Under torchrun: every rank trains; rank 0 alone reads and writes OUT. Whatever it refuses, it refuses
    before anything is written, and every rank stops with the same error."""
    cfg.validate()
    with session(cfg.device) as dist, contextlib.ExitStack() as hold:
        files = RunFiles(Path(cfg.out))

        def claim_out() -> dict | None:
            """Rank 0: the store checked, then OUT claimed (run_folder.claim): last.pt (--resume) or None."""
            store = open_store(cfg.store)  # a store fit cannot train from is refused before OUT is created
            check_finetune(cfg, store)
            store.close()
            return claim(files, cfg.resume, hold)

        # OUT is rank 0's: it makes the refusals and reads last.pt; the others get the same checkpoint (no
        # need for OUT to be visible from every node) or raise the same error.
        ckpt = dist.decide(claim_out)
        if ckpt is not None:
            cfg = resume_config(cfg, ckpt["train_config"])
            cfg.check_scst(resumed_history(ckpt, files), ckpt["epoch"])
        data = dist.check(lambda: _prepare_checked(cfg, ckpt, files, dist.world))
        if ckpt is None:
            state = start(cfg, data, dist.device)
        else:
            state = resume(ckpt, cfg, files, dist.device)
            if dist.is_main:
                complete_files(ckpt, state.best, files)
            if state.epoch >= cfg.epochs:
                log.info(f"{files.last} already has {state.epoch} epochs (asked for {cfg.epochs}): nothing to do")
                return {}
            log.info(f"resuming from {files.last} after epoch {state.epoch}")
        if dist.is_main:
            files.out.mkdir(parents=True, exist_ok=True)
        return run_epochs(state, data, cfg, files, dist)


def _prepare_checked(cfg: TrainConfig, ckpt: dict | None, files: RunFiles, world: int) -> TrainingData:
    """prepare(), and what this rank's store must satisfy: last.pt's features and vocabulary on --resume,
    at least one training image per process."""
    data = prepare(cfg)
    check_finetune(cfg, data.store)
    if ckpt is not None:
        check_resumable(ckpt, data, files.last)
    if len(data.train_rows) < world:
        raise UserError(f"{len(data.train_rows)} training images cannot be shared by {world} processes")
    return data


def run_epochs(state: TrainingState, data: TrainingData, cfg: TrainConfig, files: RunFiles, dist: Dist) -> dict:
    """The loop: epochs state.epoch + 1 .. cfg.epochs, each trained, validated and (by rank 0) saved. Returns
    the last epoch's metrics."""
    device = dist.device
    train = Batches(
        data.store,
        data.captions,
        data.train_rows,
        cfg.batch_size,
        cfg.captions_per_image,
        device,
        rank=dist.rank,
        world=dist.world,
    )
    if fits_on_gpu(cfg, train, device):
        train.make_resident()
    val = validation_set(data, cfg, dist)
    if cfg.compile:
        compile_cell(state.model.decoder)
    phases = Phases(state.model, data, cfg, dist, state.epoch)
    log.info(
        f"fit: {len(data.train_rows)} train / {len(data.val_rows)} val images, vocabulary {len(data.vocab)}, "
        f"{count_parameters(state.model, trainable=True) / 1e6:.1f}M parameters trained, device {device}"
        + (", features resident on the GPU" if train.resident is not None else "")
        + (f", {dist.world} processes (global batch {cfg.batch_size * dist.world} images)" if dist.enabled else "")
    )
    encoder_note(cfg, data.store)
    if cfg.scst_after is not None and cfg.scst_after < cfg.epochs and val.metric != "val_cider_d":
        log.warning(_SCST_BY_LOSS)
    if val.metric == "neg_train_loss":
        log.info(
            f"{data.store.path} has no validation images: model.pt will be the epoch with the lowest training loss"
        )
    record: dict = {}
    writer = EpochWriter()
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            dist.seed_epoch(cfg.seed, epoch)
            state.model.train_encoder = trains_encoder(cfg, epoch)
            record = {"epoch": epoch} | phases.train(epoch, state.optimizer, train)
            state.scheduler.step()
            record["lr"] = state.optimizer.param_groups[0]["lr"]
            if cfg.finetune is not None:
                record["encoder_lr"] = state.optimizer.param_groups[1]["lr"]
                record["encoder_trained"] = state.model.train_encoder
            record |= validate(state.model, data, val, cfg, dist)
            # every rank gets the same record (losses all-reduced, rank 0's validation broadcast) and the same
            # best so far (restored from the same last.pt): the best-epoch choice is the same on every rank
            is_best = state.end_epoch(record, val.metric)
            if dist.is_main:
                save_epoch(files, state, data, cfg, is_best, writer)
                log.info(_epoch_line(record, is_best, val.sample_name))
                if record["phase"] == "scst" and collapsing(state.records):
                    log.warning(_collapse_line(state))
    finally:
        writer.close()
    return record


_SCST_BY_LOSS = (
    "SCST raises the cross-entropy it does not optimise, and model.pt is chosen by loss here (no validation images "
    "decoded): it will likely stay a cross-entropy epoch; give --val-decode-images N to choose it by CIDEr-D"
)


class Phases:
    """The module each epoch trains, by its phase: `CaptionTraining` (cross-entropy, "xe") up to
    cfg.scst_after, `scst.SelfCriticalTraining` ("scst") after it; DDP-wrapped under torchrun, one wrapper at a
    time (two wrappers on the same parameters would both hook their gradients). The SCST rewards' CIDEr-D
    tables are built once, when the first SCST epoch starts."""

    def __init__(self, model: CaptionModel, data: TrainingData, cfg: TrainConfig, dist: Dist, epochs_done: int) -> None:
        self.model, self.data, self.cfg, self.dist = model, data, cfg, dist
        # layer4 trains only after --finetune-after epochs: until then DDP must expect parameters without gradients
        self.partial = cfg.finetune is not None and cfg.finetune_after > epochs_done
        self.phase = ""
        self.module: torch.nn.Module | None = None
        self.rewards: Rewards | None = None

    def of(self, epoch: int) -> str:
        """The phase of `epoch`."""
        return "scst" if self.cfg.scst_after is not None and epoch > self.cfg.scst_after else "xe"

    def _build(self, phase: str) -> torch.nn.Module:
        if phase == "xe":
            return CaptionTraining(self.model, self.cfg.attention_penalty)
        if self.rewards is None:
            self.rewards = Rewards(self.data.vocab, self.data.captions, self.data.train_rows)
            log.info(f"self-critical training (CIDEr-D rewards, {self.cfg.scst_baseline} baseline) from this epoch on")
        return SelfCriticalTraining(self.model, self.rewards, self.cfg.scst_baseline, max_steps=self.cfg.max_len - 1)

    def train(self, epoch: int, optimizer: torch.optim.Optimizer, batches: Batches) -> dict:
        """One epoch of its phase: train_epoch's or scst.scst_epoch's record, with `phase`."""
        phase = self.of(epoch)
        if phase != self.phase:
            if self.module is not None and self.dist.enabled:
                self.module = None
                gc.collect()  # the previous DDP wrapper's gradient hooks go with it
            self.module = self.dist.wrap(self._build(phase), find_unused_parameters=self.partial)
            self.phase = phase
        if phase == "scst":
            return scst_epoch(self.module, optimizer, batches, epoch, self.cfg, self.dist)
        return {"phase": "xe"} | train_epoch(self.module, optimizer, batches, epoch, self.cfg, self.dist)


def _collapse_line(state: TrainingState) -> str:
    rewards = [f"{r['reward']:.3f}" for r in state.records if r.get("phase") == "scst"][-4:]
    return (
        f"SCST: the mean sampled reward fell 3 epochs in a row ({' > '.join(rewards)}): the policy may be "
        f"collapsing (try a lower --lr). model.pt stays the epoch with the best validation score "
        f"(epoch {state.best.epoch}, {state.best.metric} {state.best.score:.3f})"
    )


def trains_encoder(cfg: TrainConfig, epoch: int) -> bool:
    """Whether layer4 trains in this epoch: with --finetune, after the --finetune-after epochs of the decoder alone."""
    return cfg.finetune is not None and epoch > cfg.finetune_after


def encoder_note(cfg: TrainConfig, store: FeatureStore) -> None:
    """Say what runs between the store and the decoder when it is more than a read."""
    if store.layer == "layer4":
        return
    if cfg.finetune is None:
        log.info(
            f"{store.path} holds layer3 features and --finetune is not given: layer4 runs frozen on every batch, "
            "which is slower than training from a layer4 store (`extract --layer layer4`)"
        )
    elif cfg.finetune_after > 0:
        log.info(f"fine-tuning layer4 from epoch {cfg.finetune_after + 1} (the decoder alone before)")


def _epoch_line(record: dict, is_best: bool, sample_name: str) -> str:
    cider = f" val CIDEr-D {record['val_cider_d']:.3f}" if "val_cider_d" in record else ""
    val = f"{record['val_loss']:.3f}" if math.isfinite(record["val_loss"]) else "-"
    scst = f" scst reward {record['reward']:.3f} baseline {record['baseline']:.3f}" if "reward" in record else ""
    return (
        f"epoch {record['epoch']}:{scst} train loss {record['train_loss']:.3f} val loss {val}{cider} "
        f"{record['seconds']:.1f}s {record['samples_per_second']:,.0f} samples/s{' *best*' if is_best else ''}"
        f" | {sample_name}: {record['sample']}"
    )
