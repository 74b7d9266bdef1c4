"""`fit`: train the decoder alone from the memory-mapped store.

`fit` is the loop. What it is built from: `prepare` (store, vocabulary, encoded captions), `build_model`,
`make_optimizer`/`make_scheduler`, `train_epoch` (one pass, `train_step` per batch), `validate` (loss,
CIDEr-D, a sample caption), `Best` (which epoch model.pt holds), and `save_epoch` (the run's files, through
pipeline/checkpoint.py and pipeline/history.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, history
from pipeline.config import TrainConfig
from pipeline.console import info, progress
from pipeline.data import Batches, CaptionIndex, feature_scale, validation_batches
from pipeline.decode import decode_rows
from pipeline.errors import UserError, describe
from pipeline.figures import training_curves
from pipeline.files import check_writable_folder, exclusive, remove_stale_temps
from pipeline.loss import caption_loss, validation_loss
from pipeline.model import DECODER_PRESETS, Decoder, DecoderConfig, count_parameters
from pipeline.runtime import autocast, resolve_device
from pipeline.store import FeatureStore
from pipeline.vocab import Vocabulary

__all__ = ["TrainConfig", "fit", "prepare", "train_step", "make_optimizer", "build_model"]

# What a resumed run takes from last.pt's train_config instead of from the command line, and why:
RESUMED_KEYS = (
    # what defines the model and its data: the saved weights only fit these
    "decoder",
    "min_word_count",
    "max_len",
    "init_from_features",
    "dropout",
    "gate",
    "feature_scale",
    # what defines the training trajectory: resumed, the run must end where an uninterrupted one ends
    "seed",
    "batch_size",
    "lr",
    "grad_clip",
    "lr_step",
    "lr_gamma",
    "captions_per_image",
    "attention_penalty",
    # how model.pt is chosen: CIDEr-D and loss scores of different epochs must not be compared
    "val_decode_images",
    "val_beam_size",
)


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

    model: Decoder
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


@dataclass
class Validation:
    """What each epoch is validated on, fixed for the run."""

    batches: Batches  # the validation images' first 5 captions, for the loss
    decode_rows: np.ndarray  # images decoded for CIDEr-D (none: choose by loss)
    references: list[list[str]]  # their captions
    sample_row: int  # the image whose caption is printed each epoch
    sample_name: str
    metric: str  # how model.pt is chosen: one of SELECTION_METRICS


def check_config(cfg: TrainConfig) -> None:
    """Values that no training can start from, refused before any work."""
    for name, value, low in (
        ("epochs", cfg.epochs, 1),
        ("batch-size", cfg.batch_size, 1),
        ("captions-per-image", cfg.captions_per_image, 1),
        ("min-word-count", cfg.min_word_count, 1),
        ("val-decode-images", cfg.val_decode_images, 0),
        ("lr-step", cfg.lr_step, 0),
    ):
        if value < low:
            raise UserError(f"--{name} must be at least {low}")
    for name, value in (
        ("lr", cfg.lr),
        ("grad-clip", cfg.grad_clip),
        ("lr-gamma", cfg.lr_gamma),
        ("dropout", cfg.dropout),
        ("attention-penalty", cfg.attention_penalty),
    ):
        if not math.isfinite(value):
            raise UserError(f"--{name} must be a number, not {value}")
    if cfg.lr <= 0 or cfg.lr_gamma <= 0:
        raise UserError("--lr and --lr-gamma must be positive")
    if cfg.grad_clip < 0 or cfg.attention_penalty < 0 or not 0 <= cfg.dropout < 1:
        raise UserError("--grad-clip and --attention-penalty must be at least 0, --dropout in [0, 1)")
    if cfg.decoder not in DECODER_PRESETS:
        raise UserError(f"unknown --decoder {cfg.decoder!r} (known: {', '.join(DECODER_PRESETS)})")


def open_store(path: str | Path) -> FeatureStore:
    """The store, when fit can train from it: complete, with captions and training images."""
    store = FeatureStore(path)
    if not store.complete:
        pending = int((store.status == 0).sum())
        raise UserError(f"{path} is incomplete ({pending} images pending): rerun the same extract to finish it")
    if len(store.caption_image) == 0:
        raise UserError(f"{path} holds no captions")
    if len(store.split_rows("train")) == 0:
        raise UserError(f"{path} has no training images (no image in the train split)")
    return store


def prepare(cfg: TrainConfig, store: FeatureStore | None = None) -> TrainingData:
    """Open the store (unless given), build the vocabulary from the train split, encode and index the captions."""
    store = store or open_store(cfg.store)
    texts, caption_rows = store.caption_text, store.caption_image
    train_rows, val_rows = store.split_rows("train"), store.split_rows("val")
    vocab = train_vocabulary(texts, caption_rows, train_rows, cfg.min_word_count)
    captions = CaptionIndex.build(vocab, texts, caption_rows, len(store), cfg.max_len)
    return TrainingData(store, vocab, captions, train_rows, val_rows)


def train_vocabulary(
    texts: list[str], caption_rows: np.ndarray, train_rows: np.ndarray, min_count: int
) -> Vocabulary:
    """The vocabulary of the captions of the training images only (`texts[i]` describes `caption_rows[i]`)."""
    is_train = np.zeros(int(max(caption_rows.max(initial=-1), train_rows.max(initial=-1))) + 1, dtype=bool)
    is_train[train_rows] = True
    return Vocabulary.build((t for t, r in zip(texts, caption_rows, strict=True) if is_train[r]), min_count)


def resume_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The config of a resumed run: `cfg` (epochs, device, out, amp... from the command line) with the
    RESUMED_KEYS of the checkpoint's train_config. `cfg` itself is not changed."""
    return dataclasses.replace(cfg, **{k: saved[k] for k in RESUMED_KEYS if k in saved})


def build_model(cfg: TrainConfig, vocab_size: int, scale: float) -> Decoder:
    """The decoder a new run trains, initialised from torch's RNG (fit seeds it first)."""
    return Decoder(
        DecoderConfig.preset(
            cfg.decoder,
            vocab_size=vocab_size,
            init_from_features=cfg.init_from_features,
            dropout=cfg.dropout,
            gate=cfg.gate,
            feature_scale=scale,
        )
    )


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused implementation where this torch has it (CPU and CUDA): the same update in one pass
    over the parameters instead of a dozen (measured: 860 -> 604 ms per CPU batch at 18.5k words)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """StepLR every `lr_step` epochs; lr_step 0 keeps the rate constant."""
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(cfg.lr_step, 1), gamma=cfg.lr_gamma if cfg.lr_step > 0 else 1.0
    )


LossFn = Callable[[Decoder, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def train_step(
    model: Decoder, optimizer: torch.optim.Optimizer, batch, cfg: TrainConfig, loss_fn: LossFn = caption_loss
) -> torch.Tensor:
    """One optimisation step on a batch; returns the (detached) masked loss. fit and the benchmarks use it."""
    with autocast(batch.features.device, cfg.amp):
        total, loss = loss_fn(model, batch.features, batch.tokens, cfg.attention_penalty)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


def train_epoch(
    model: Decoder,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    epoch: int,
    cfg: TrainConfig,
    loss_fn: LossFn = caption_loss,
) -> dict:
    """One pass over the training images: train_loss (mean over batches), seconds (the pass alone) and
    samples_per_second (captions)."""
    model.train()
    device = batches.device
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per batch
    samples = 0
    with progress(len(batches), f"epoch {epoch}/{cfg.epochs}", unit="batch") as advance:
        for batch in batches.iterate(epoch, cfg.seed):
            loss_sum += train_step(model, optimizer, batch, cfg, loss_fn)
            samples += batch.tokens.shape[0] * batch.tokens.shape[1]
            advance(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"train_loss": float(loss_sum) / len(batches), "seconds": seconds, "samples_per_second": samples / seconds}


def validation_set(data: TrainingData, cfg: TrainConfig, device: torch.device) -> Validation:
    decode = data.val_rows[: cfg.val_decode_images] if cfg.val_decode_images > 0 else data.val_rows[:0]
    sample_row = int(data.val_rows[0]) if len(data.val_rows) else int(data.train_rows[0])
    metric = "val_cider_d" if len(decode) else "neg_val_loss" if len(data.val_rows) else "neg_train_loss"
    return Validation(
        validation_batches(data.store, data.captions, data.val_rows, device, cfg.batch_size),
        decode,
        data.captions.references(decode),  # read once, not every epoch
        sample_row,
        data.store.images[sample_row],
        metric,
    )


@torch.no_grad()
def validate(model: Decoder, data: TrainingData, val: Validation, cfg: TrainConfig) -> dict:
    """val_loss and val_perplexity, val_cider_d (greedy captions of the decoded images, when there are
    any), and `sample`: the caption of the sample image."""
    from pipeline.metrics import cider_d  # pycocoevalcap: imported when first needed

    model.eval()
    device, steps = val.batches.device, cfg.max_len - 1
    record = {"val_loss": validation_loss(model, val.batches, cfg.amp) if len(data.val_rows) else float("nan")}
    record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
    if len(val.decode_rows):
        decoded = decode_rows(model, data.store.features, val.decode_rows, device, cfg.val_beam_size, steps)
        record["val_cider_d"] = cider_d([data.vocab.decode(d.tokens) for d in decoded], val.references)
    sample = decode_rows(model, data.store.features, np.array([val.sample_row]), device, 1, steps)[0]
    record["sample"] = data.vocab.decode(sample.tokens)
    return record


def fit(cfg: TrainConfig) -> dict:
    """Train for `cfg.epochs` epochs in total (resumed epochs included). After each epoch: OUT/last.pt,
    OUT/model.pt when the epoch is the best so far, OUT/metrics.jsonl, OUT/curves.png. Returns the last
    epoch's metrics ({} when last.pt already had every epoch).

    Everything that can be checked is checked before the first step: the settings, the store, that OUT can
    be written, that no other process writes it (the lock), and that it holds no other run's files."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    store = open_store(cfg.store)
    files = RunFiles(check_writable_folder(cfg.out, "--out"))
    with exclusive(files.out, f"--out {files.out}"):
        for path in files.all():
            remove_stale_temps(path)  # left by a run killed with -9 while writing
        ckpt = _load_last(files) if cfg.resume else _refuse_earlier_run(files)
        if ckpt is not None:
            cfg = resume_config(cfg, ckpt["train_config"])
        data = prepare(cfg, store)
        if ckpt is None:
            state = start(cfg, data, device)
        else:
            _check_resumable(ckpt, data, files.last)
            state = resume(ckpt, cfg, files, device)
            if state.epoch >= cfg.epochs:
                info(f"{files.last} already has {state.epoch} epochs (asked for {cfg.epochs}): nothing to do")
                return {}
            info(f"resuming from {files.last} after epoch {state.epoch}")
        return run_epochs(state, data, cfg, files, device)


def run_epochs(
    state: TrainingState, data: TrainingData, cfg: TrainConfig, files: RunFiles, device: torch.device
) -> dict:
    """The loop: epochs state.epoch + 1 .. cfg.epochs, each trained, validated and saved. Returns the last
    epoch's metrics."""
    train = Batches(data.store, data.captions, data.train_rows, cfg.batch_size, cfg.captions_per_image, device)
    if _fits_on_gpu(cfg, train, device):
        train.make_resident()
    val = validation_set(data, cfg, device)
    loss_fn = torch.compile(caption_loss) if cfg.compile else caption_loss
    info(
        f"fit: {len(data.train_rows)} train / {len(data.val_rows)} val images, vocabulary {len(data.vocab)}, "
        f"{count_parameters(state.model) / 1e6:.1f}M parameters, device {device}"
        + (", features resident on the GPU" if train.resident is not None else "")
    )
    if val.metric == "neg_train_loss":
        info(f"{data.store.path} has no validation images: model.pt will be the epoch with the lowest training loss")
    record: dict = {}
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        record = {"epoch": epoch} | train_epoch(state.model, state.optimizer, train, epoch, cfg, loss_fn)
        state.scheduler.step()
        record["lr"] = state.optimizer.param_groups[0]["lr"]
        record |= validate(state.model, data, val, cfg)
        is_best = state.end_epoch(record, val.metric)
        save_epoch(files, state, data, cfg, is_best)
        info(_epoch_line(record, is_best, val.sample_name))
    return record


def start(cfg: TrainConfig, data: TrainingData, device: torch.device) -> TrainingState:
    """A new run: the model initialised from `cfg.seed`, fresh optimizer and scheduler."""
    torch.manual_seed(cfg.seed)
    scale = feature_scale(data.store.features, data.train_rows) if cfg.feature_scale else 1.0
    model = build_model(cfg, len(data.vocab), scale).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    return TrainingState(model, optimizer, make_scheduler(optimizer, cfg))


def resume(ckpt: dict, cfg: TrainConfig, files: RunFiles, device: torch.device) -> TrainingState:
    """The run saved in last.pt (`ckpt`), continued: weights, optimizer, scheduler, RNG, best epoch and the
    metrics of the epochs it holds. What a kill left unwritten after last.pt is written first."""
    model, _ = checkpoint.build_decoder(ckpt, files.last)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        checkpoint.restore_rng_state(ckpt["rng"])
        best = Best.from_dict(ckpt["best"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what mismatched states raise
        raise UserError(f"{files.last} is not a valid last.pt: {describe(e)}") from None
    _complete_files(ckpt, best, files)
    return TrainingState(model, optimizer, scheduler, ckpt["epoch"], best, _resumed_history(ckpt, files))


def _resumed_history(ckpt: dict, files: RunFiles) -> list[dict]:
    """The metrics of the epochs last.pt holds: its own copy (metrics.jsonl may hold a line of an epoch
    written after it, before a kill), or for a last.pt without one, metrics.jsonl cut at its epoch."""
    found = ckpt["history"] if isinstance(ckpt.get("history"), list) else history.read(files.metrics)
    return [r for r in found if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= ckpt["epoch"]]


def _complete_files(ckpt: dict, best: Best, files: RunFiles) -> None:
    """Finish the writes that a kill interrupted after last.pt was saved: model.pt of that epoch when it was
    the best, metrics.jsonl and curves.png as of that epoch."""
    if best.epoch == ckpt["epoch"] and _saved_epoch(files.model) != best.epoch:
        checkpoint.save(checkpoint.model_only(ckpt), files.model)
    records = _resumed_history(ckpt, files)
    if history.write(files.metrics, records) or (records and not files.curves.exists()):
        training_curves(records, files.curves)


def _saved_epoch(path: Path) -> int | None:
    try:
        return checkpoint.load(path)["epoch"]
    except UserError:
        return None


def save_epoch(files: RunFiles, state: TrainingState, data: TrainingData, cfg: TrainConfig, is_best: bool) -> None:
    """The run's files after an epoch, each replaced atomically, last.pt first: from the moment it is saved the
    run resumes from this epoch, and a resume completes whatever a kill left unwritten after it."""
    ckpt = checkpoint.model_state(
        state.model, data.vocab, cfg.to_dict(), data.store, state.epoch, state.best.to_dict(), state.records[-1]
    )
    checkpoint.save(ckpt | checkpoint.training_state(state.optimizer, state.scheduler, state.records), files.last)
    if is_best:
        checkpoint.save(ckpt, files.model)
    history.write(files.metrics, state.records)
    training_curves(state.records, files.curves)


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


def _check_resumable(ckpt: dict, data: TrainingData, path: Path) -> None:
    """last.pt continues only on the same features and the same vocabulary."""
    checkpoint.check_same_encoder(ckpt, data.store, path)
    if data.vocab.to_list() != ckpt["vocab"]:
        raise UserError(f"{path} has a vocabulary that does not match the captions of {data.store.path}")


def _fits_on_gpu(cfg: TrainConfig, batches: Batches, device: torch.device) -> bool:
    """Whether to copy the training features to the GPU once (cfg.resident: auto | yes | no)."""
    if device.type != "cuda" or cfg.resident == "no":
        return False
    feats = batches.store.features
    need = len(batches.rows) * int(np.prod(feats.shape[1:])) * feats.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if cfg.resident == "yes" or need < 0.6 * free:
        return True
    info(f"training features ({need / 2**30:.1f} GiB) do not fit on the GPU: reading them from the memory map")
    return False


def _epoch_line(record: dict, is_best: bool, sample_name: str) -> str:
    cider = f" val CIDEr-D {record['val_cider_d']:.3f}" if "val_cider_d" in record else ""
    val = f"{record['val_loss']:.3f}" if math.isfinite(record["val_loss"]) else "-"
    return (
        f"epoch {record['epoch']}: train loss {record['train_loss']:.3f} val loss {val}{cider} "
        f"{record['seconds']:.1f}s {record['samples_per_second']:,.0f} samples/s{' *best*' if is_best else ''}"
        f" | {sample_name}: {record['sample']}"
    )
