"""Validation after each epoch: the loss of the validation images, the CIDEr-D of their greedy captions (how
model.pt is chosen), and a sample caption. Under torchrun the ranks share the work."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cider import CorpusScore
from pipeline.config import TrainConfig
from pipeline.data import Batches, validation_batches
from pipeline.decode import decode_rows
from pipeline.distributed import Dist
from pipeline.loss import validation_sums
from pipeline.model import CaptionModel
from pipeline.train.state import TrainingData


@dataclass
class Validation:
    """What each epoch is validated on, fixed for the run. Under torchrun each rank holds its share of the
    validation images' batches and decodes its share of `decode_rows`."""

    batches: Batches  # the validation images' first 5 captions, for the loss (this rank's share)
    decode_rows: np.ndarray  # images decoded for CIDEr-D (none: choose by loss), all of them
    cider: CorpusScore | None  # CIDEr-D against their captions, the references' n-gram statistics counted once
    sample_row: int  # the image whose caption is printed each epoch
    sample_name: str
    metric: str  # how model.pt is chosen: one of SELECTION_METRICS


def validation_set(data: TrainingData, cfg: TrainConfig, dist: Dist) -> Validation:
    decode = data.val_rows[: cfg.val_decode_images] if cfg.val_decode_images > 0 else data.val_rows[:0]
    sample_row = int(data.val_rows[0]) if len(data.val_rows) else int(data.train_rows[0])
    metric = "val_cider_d" if len(decode) else "neg_val_loss" if len(data.val_rows) else "neg_train_loss"
    return Validation(
        validation_batches(data.store, data.captions, dist.part(data.val_rows), dist.device, cfg.batch_size),
        decode,
        CorpusScore(data.captions.references(decode)) if len(decode) else None,  # once, not every epoch
        sample_row,
        data.store.images[sample_row],
        metric,
    )


@torch.no_grad()
def validate(
    model: CaptionModel, data: TrainingData, val: Validation, cfg: TrainConfig, dist: Dist | None = None
) -> dict:
    """val_loss and val_perplexity, val_cider_d (greedy captions of the decoded images, when there are
    any), and `sample`: the caption of the sample image. Under torchrun the ranks share the work (losses
    summed, captions gathered in order) and every rank returns rank 0's record."""
    dist = dist or Dist()
    model.eval()
    device, steps = val.batches.device, cfg.max_len - 1
    total, tokens = dist.sum(*validation_sums(model, val.batches, cfg.amp))
    record = {"val_loss": total / max(tokens, 1) if len(data.val_rows) else float("nan")}
    record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
    if val.cider is not None:
        mine = decode_rows(model, data.store.features, dist.part(val.decode_rows), device, cfg.val_beam_size, steps)
        decoded = dist.gather_sequences([d.tokens for d in mine], steps)  # padded for the gather, in row order
        if dist.is_main:
            record["val_cider_d"] = val.cider([data.vocab.decode(d) for d in decoded])  # = metrics.cider_d
    if dist.is_main:
        sample = decode_rows(model, data.store.features, np.array([val.sample_row]), device, 1, steps)[0]
        record["sample"] = data.vocab.decode(sample.tokens)
    return dist.broadcast(record)
