"""What a fit run is: the data it derives from the store (`TrainingData`), what the epochs change and last.pt
saves (`TrainingState`), which epoch model.pt holds (`Best`), and what a resumed run takes from last.pt
(`RESUMED_KEYS`, `SCST_KEYS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import CaptionIndex
from pipeline.model import CaptionModel
from pipeline.store import FeatureStore
from pipeline.vocab import Vocabulary

# What a resumed run takes from last.pt's train_config instead of from the command line, and why:
RESUMED_KEYS = (
    # what defines the model and its data: the saved weights only fit these
    "decoder",
    "min_word_count",
    "max_len",
    "init_from_features",
    "init_from_grid",
    "init_drop",
    "dropout",
    "gate",
    "feature_norm",
    "finetune",
    # what defines the training trajectory: resumed, the run must end where an uninterrupted one ends
    "seed",
    "batch_size",
    "lr",
    "grad_clip",
    "lr_step",
    "lr_gamma",
    "warmup_steps",
    "lr_schedule",
    "captions_per_image",
    "attention_penalty",
    "encoder_lr",
    "finetune_after",
    # how model.pt is chosen: CIDEr-D and loss scores of different epochs must not be compared
    "val_decode_images",
    "val_beam_size",
    # how the word vectors began (their values are in the weights) and whether they train
    "embeddings",
    "freeze_embeddings",
    "word2vec",
)
# Schedule options (not RESUMED_KEYS: --resume honours them), that a resumed run takes from last.pt when the
# command does not give them: `fit --resume` alone continues an SCST schedule instead of falling back to
# cross-entropy
SCST_KEYS = ("scst_after", "scst_baseline")


@dataclass
class TrainingData:
    """The store and what fit derives from it before the first step."""

    store: FeatureStore
    vocab: Vocabulary
    captions: CaptionIndex
    train_rows: np.ndarray
    val_rows: np.ndarray


# How model.pt is chosen, by what the store offers: validation CIDEr-D, else validation loss, else (a store
# without validation images) training loss. Fixed for a run: scores of different kinds are never compared.
SELECTION_METRICS = ("val_cider_d", "neg_val_loss", "neg_train_loss")


@dataclass(frozen=True)
class Best:
    """The epoch model.pt holds: the highest score (one of SELECTION_METRICS); a tie (CIDEr-D is often 0 for
    the first epochs) goes to the lower validation loss. A score that is not a number (a diverged run) counts
    as the lowest, so that an epoch is always chosen: a run never ends without a model.pt."""

    metric: str = ""
    score: float = -math.inf
    val_loss: float = math.inf
    epoch: int = 0  # 0: none yet

    @classmethod
    def of(cls, record: dict, metric: str) -> Best:
        score = {
            "val_cider_d": lambda: record["val_cider_d"],
            "neg_val_loss": lambda: -record["val_loss"],
            "neg_train_loss": lambda: -record["train_loss"],
        }[metric]()
        val_loss = record["val_loss"]
        return cls(
            metric,
            score if math.isfinite(score) else -math.inf,
            val_loss if math.isfinite(val_loss) else math.inf,
            record["epoch"],
        )

    def beaten_by(self, other: Best) -> bool:
        return self.epoch == 0 or (other.score, -other.val_loss) > (self.score, -self.val_loss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Best:
        # checkpoints written before this class stored minus the validation loss as "tiebreak"
        val_loss = d["val_loss"] if "val_loss" in d else -d.get("tiebreak", -math.inf)
        return cls(str(d["metric"]), float(d["score"]), float(val_loss), int(d["epoch"]))


@dataclass
class TrainingState:
    """What the epochs change, and what last.pt saves so that --resume continues exactly."""

    model: CaptionModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    epoch: int = 0  # epochs done
    best: Best = Best()
    records: list[dict] = dataclasses.field(default_factory=list)  # metrics.jsonl: one record per epoch done

    def end_epoch(self, record: dict, metric: str) -> bool:
        """Count the epoch of `record` as done; True when it is the best so far (model.pt is then replaced)."""
        self.epoch = record["epoch"]
        self.records.append(record)
        candidate = Best.of(record, metric)
        if self.best.beaten_by(candidate):
            self.best = candidate
            return True
        return False
