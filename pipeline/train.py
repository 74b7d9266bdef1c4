"""`fit`: train the decoder from the memory-mapped store, in one process or under torchrun; from a layer3 store,
optionally ResNet50's layer4 too.

The model is a `CaptionModel`: the decoder, with layer4 in front of it when the store holds layer3 features
(`--finetune layer4` trains it, with its own learning rate; otherwise it runs frozen, under no_grad). fit
trains it inside `loss.CaptionTraining`, the one module DDP wraps.

`fit` is the loop. What it is built from: `prepare` (store, vocabulary, encoded captions), `build_model`,
`make_optimizer`/`make_scheduler`, `train_epoch` (one pass, `train_step` per batch), `validate` (loss,
CIDEr-D, a sample caption), `Best` (which epoch model.pt holds), and `save_epoch` (the run's files, through
pipeline/checkpoint.py and pipeline/history.py).

Under torchrun (pipeline/distributed.py) every rank runs the same loop on its share of each global batch
(`data.Batches`), with the training module wrapped in DistributedDataParallel; rank 0 alone looks at and
writes OUT, and validation is split across the ranks and gathered. In one process none of that exists: no
process group, no wrapper, the same arithmetic as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, history
from pipeline.config import TrainConfig, Word2VecConfig
from pipeline.console import info, progress, warn
from pipeline.data import Batches, CaptionIndex, FeatureStats, feature_stats, validation_batches
from pipeline.decode import decode_rows
from pipeline.distributed import Dist, session
from pipeline.encoder import build_recorded, split_resnet50
from pipeline.errors import UserError, describe
from pipeline.figures import training_curves
from pipeline.files import check_writable_folder, exclusive, remove_stale_temps
from pipeline.loss import CaptionTraining, validation_sums
from pipeline.model import (
    DECODER_PRESETS,
    CaptionModel,
    Decoder,
    DecoderConfig,
    compile_cell,
    count_parameters,
    run_encoder,
)
from pipeline.runtime import autocast
from pipeline.scst import BASELINES, Rewards, SelfCriticalTraining, collapsing, scst_epoch
from pipeline.store import FeatureStore, layer_of
from pipeline.vocab import Vocabulary

__all__ = [  # the API that fine-tuning, torchrun and the benchmarks build on; TrainConfig is pipeline.config's
    "TrainConfig",
    "fit",
    "run_epochs",
    "start",
    "resume",
    "prepare",
    "open_store",
    "check_config",
    "resume_config",
    "build_model",
    "build_encoder",
    "make_optimizer",
    "make_scheduler",
    "train_step",
    "train_epoch",
    "validation_set",
    "validate",
    "save_epoch",
    "Best",
    "RunFiles",
    "TrainingData",
    "TrainingState",
    "Validation",
    "RESUMED_KEYS",
    "SELECTION_METRICS",
    "fits_on_gpu",
]
FINETUNE_LAYERS = ("layer4",)
FEATURE_NORMS = ("channel", "rms", "none")  # TrainConfig.feature_norm

# What a resumed run takes from last.pt's train_config instead of from the command line, and why:
RESUMED_KEYS = (
    # what defines the model and its data: the saved weights only fit these
    "decoder",
    "min_word_count",
    "max_len",
    "init_from_features",
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


@dataclass
class Validation:
    """What each epoch is validated on, fixed for the run. Under torchrun each rank holds its share of the
    validation images' batches and decodes its share of `decode_rows`."""

    batches: Batches  # the validation images' first 5 captions, for the loss (this rank's share)
    decode_rows: np.ndarray  # images decoded for CIDEr-D (none: choose by loss), all of them
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
    if cfg.feature_norm not in FEATURE_NORMS:
        raise UserError(f"--feature-norm takes {', '.join(FEATURE_NORMS)}, not {cfg.feature_norm!r}")
    if cfg.decoder not in DECODER_PRESETS:
        raise UserError(f"unknown --decoder {cfg.decoder!r} (known: {', '.join(DECODER_PRESETS)})")
    if cfg.finetune is not None and cfg.finetune not in FINETUNE_LAYERS:
        raise UserError(f"--finetune takes {', '.join(FINETUNE_LAYERS)}, not {cfg.finetune!r}")
    if cfg.encoder_lr <= 0:
        raise UserError("--encoder-lr must be positive")
    if cfg.finetune_after < 0:
        raise UserError("--finetune-after must be at least 0")
    check_scst(cfg)


def check_scst(cfg: TrainConfig, records: list[dict] | None = None, epochs_done: int = 0) -> None:
    """SCST settings, and that SCST starts from a model trained with cross-entropy: sampled from an untrained
    decoder, captions score a CIDEr-D of ~0 whatever it does, the advantages are 0 and nothing is learnt.
    `records` (a resumed run's metrics) count the cross-entropy epochs already done."""
    if cfg.scst_baseline not in BASELINES:
        raise UserError(f"--scst-baseline takes {', '.join(BASELINES)}, not {cfg.scst_baseline!r}")
    if cfg.scst_after is None or cfg.scst_after >= cfg.epochs:
        return
    done = [r for r in records or [] if r.get("phase", "xe") == "xe" and r["epoch"] <= cfg.scst_after]
    xe_epochs = len(done) + max(0, cfg.scst_after - epochs_done)
    if cfg.scst_after < 1 or xe_epochs < 1:
        raise UserError(
            f"--scst-after {cfg.scst_after} would start self-critical training on a decoder with no "
            "cross-entropy training: its sampled captions score a CIDEr-D of about 0, which gives no signal. "
            "Train with cross-entropy first (--scst-after N, N >= 1, e.g. --epochs 50 --scst-after 30)"
        )


def check_finetune(cfg: TrainConfig, store: FeatureStore) -> None:
    """--finetune layer4 trains layer4 from its input: a layer3 store. (Checked on the run's config: a resumed
    run's is last.pt's.)"""
    if cfg.finetune_after > 0 and cfg.finetune is None:
        raise UserError("--finetune-after needs --finetune layer4 (without it nothing is fine-tuned)")
    if cfg.finetune == "layer4" and store.layer != "layer3":
        raise UserError(
            f"--finetune layer4 needs a layer3 store, and {store.path} holds {store.layer} features (the output "
            "of the layer4 it would train). Make one with `cli.py extract --layer layer3 --store FILE` (the same "
            "--images and --weights), then `cli.py fit --store FILE --finetune layer4`"
        )


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
    RESUMED_KEYS of the checkpoint's train_config. `cfg` itself is not changed. An option the user typed
    (`cfg.typed`) with another value than the checkpoint's is a UserError naming both: never ignored."""
    resumed = {k: saved[k] for k in RESUMED_KEYS if k in saved}
    if "feature_norm" not in saved:  # checkpoints from before per-channel statistics: a bool, one scale or none
        resumed["feature_norm"] = "rms" if saved.get("feature_scale", True) else "none"
    if isinstance(resumed.get("word2vec"), dict):  # saved as a plain dict (weights_only checkpoints)
        resumed["word2vec"] = Word2VecConfig(**resumed["word2vec"])
    # checkpoints from before word vectors: random and trained, whatever this command line says
    resumed.setdefault("embeddings", "random")
    resumed.setdefault("freeze_embeddings", False)
    # the SCST schedule is the command line's when given (typed, or set by a script), else last.pt's
    given = {k for k in SCST_KEYS if k in cfg.typed or getattr(cfg, k) != getattr(TrainConfig, k)}
    resumed |= {k: saved[k] for k in SCST_KEYS if k in saved and k not in given}
    clashes = [k for k in cfg.typed if k in resumed and getattr(cfg, k) != resumed[k]]
    if clashes:
        shown = ", ".join(f"{_option(k, getattr(cfg, k))} (last.pt: {_option(k, resumed[k], True)})" for k in clashes)
        raise UserError(
            f"--resume continues the run in last.pt, which decides these and was trained otherwise: {shown}; "
            "drop them to continue that run, or train a new one in another --out"
        )
    return dataclasses.replace(cfg, **resumed)


def _option(key: str, value: object, bare: bool = False) -> str:
    """How a fit option is typed: `--lr 5.0`, `--gate`/`--no-gate`, `--finetune none` (bare: the value alone)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    shown = "none" if value is None else str(value)
    return shown if bare else f"{flag} {shown}"


def build_model(cfg: TrainConfig, vocab_size: int, stats: FeatureStats | None = None) -> Decoder:
    """The decoder a new run trains, initialised from torch's RNG (fit seeds it first), normalising its input
    with `stats` of the training features as `cfg.feature_norm` says (none: raw features)."""
    norm = cfg.feature_norm if stats is not None else "none"
    decoder = Decoder(
        DecoderConfig.preset(
            cfg.decoder,
            vocab_size=vocab_size,
            init_from_features=cfg.init_from_features,
            dropout=cfg.dropout,
            gate=cfg.gate,
            feature_scale=1.0 / stats.rms if norm == "rms" and stats.rms > 0 else 1.0,
            feature_norm=norm == "channel",
        )
    )
    if norm == "channel":
        decoder.set_feature_stats(stats.mean, stats.std)
    return decoder


def build_encoder(store: FeatureStore, trainable: bool) -> torch.nn.Module | None:
    """The layer4 a run from this store puts in front of the decoder: none for a layer4 store; for a layer3
    store, ResNet50's layer4 with the weights the store recorded (FrozenBatchNorm2d: only its convolutions
    train), trainable with --finetune, else frozen. On the CPU."""
    if store.layer == "layer4":
        return None
    _, head = split_resnet50(build_recorded(store.identity())[0])
    return head.requires_grad_(trainable)


def make_optimizer(model: torch.nn.Module, lr: float, encoder_lr: float | None = None) -> torch.optim.Optimizer:
    """Adam; the fused implementation where this torch has it (CPU and CUDA): the same update in one pass
    over the parameters instead of a dozen (measured: 860 -> 604 ms per CPU batch at 18.5k words).
    A CaptionModel with a trainable encoder gets two parameter groups: the decoder at `lr`, the encoder at
    `encoder_lr` (the encoder's parameters have no gradient before --finetune-after: Adam skips them)."""
    groups: list[dict] = [{"params": list(model.parameters()), "lr": lr}]
    if isinstance(model, CaptionModel):
        groups = [{"params": list(model.decoder.parameters()), "lr": lr}]
        trained = [p for p in model.encoder.parameters() if p.requires_grad] if model.encoder is not None else []
        if trained:
            groups.append({"params": trained, "lr": lr if encoder_lr is None else encoder_lr})
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """StepLR every `lr_step` epochs; lr_step 0 keeps the rate constant."""
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(cfg.lr_step, 1), gamma=cfg.lr_gamma if cfg.lr_step > 0 else 1.0
    )


def train_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, cfg: TrainConfig) -> torch.Tensor:
    """One optimisation step on a batch; returns the (detached) masked loss times the batch's weight (the
    loss itself in one process). `module` is a loss.CaptionTraining (DDP-wrapped under torchrun). fit and the
    benchmarks use it."""
    with autocast(batch.features.device, cfg.amp):
        total, loss = module(batch.features, batch.tokens, batch.weight)
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # under DDP: the gradients are averaged over the ranks here
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach() if batch.weight == 1.0 else loss.detach() * batch.weight


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
        for batch in batches.iterate(epoch, cfg.seed):
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


def validation_set(data: TrainingData, cfg: TrainConfig, dist: Dist) -> Validation:
    decode = data.val_rows[: cfg.val_decode_images] if cfg.val_decode_images > 0 else data.val_rows[:0]
    sample_row = int(data.val_rows[0]) if len(data.val_rows) else int(data.train_rows[0])
    metric = "val_cider_d" if len(decode) else "neg_val_loss" if len(data.val_rows) else "neg_train_loss"
    return Validation(
        validation_batches(data.store, data.captions, dist.part(data.val_rows), dist.device, cfg.batch_size),
        decode,
        data.captions.references(decode),  # read once, not every epoch
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
    from pipeline.cider import corpus_score as cider_d  # = metrics.cider_d, 6x faster

    dist = dist or Dist()
    model.eval()
    device, steps = val.batches.device, cfg.max_len - 1
    total, tokens = dist.sum(*validation_sums(model, val.batches, cfg.amp))
    record = {"val_loss": total / max(tokens, 1) if len(data.val_rows) else float("nan")}
    record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
    if len(val.decode_rows):
        mine = decode_rows(model, data.store.features, dist.part(val.decode_rows), device, cfg.val_beam_size, steps)
        decoded = dist.gather_sequences([d.tokens for d in mine], steps)  # padded for the gather, in row order
        if dist.is_main:
            record["val_cider_d"] = cider_d([data.vocab.decode(d) for d in decoded], val.references)
    if dist.is_main:
        sample = decode_rows(model, data.store.features, np.array([val.sample_row]), device, 1, steps)[0]
        record["sample"] = data.vocab.decode(sample.tokens)
    return dist.broadcast(record)


def fit(cfg: TrainConfig) -> dict:
    """Train for `cfg.epochs` epochs in total (resumed epochs included). After each epoch: OUT/last.pt,
    OUT/model.pt when the epoch is the best so far, OUT/metrics.jsonl, OUT/curves.png. Returns the last
    epoch's metrics ({} when last.pt already had every epoch).

    Everything that can be checked is checked before the first step: the settings, the store, that OUT can
    be written, that no other process writes it (the lock), and that it holds no other run's files.
    Under torchrun: every rank trains; rank 0 alone reads and writes OUT. Whatever it refuses, it refuses
    before anything is written, and every rank stops with the same error."""
    check_config(cfg)
    with session(cfg.device) as dist, contextlib.ExitStack() as hold:
        files = RunFiles(Path(cfg.out))

        def claim_out() -> dict | None:
            """Rank 0: OUT writable, its lock held for the whole run, temps of killed runs removed, then
            last.pt (--resume) or the refusal of an earlier run's files."""
            store = open_store(cfg.store)  # a store fit cannot train from is refused before OUT is created
            check_finetune(cfg, store)
            store.close()
            check_writable_folder(files.out, "--out")
            hold.enter_context(exclusive(files.out, f"--out {files.out}"))
            for path in files.all():
                remove_stale_temps(path, locked=True)  # left by a run killed with -9 while writing
            return _load_last(files) if cfg.resume else _refuse_earlier_run(files)

        # OUT is rank 0's: it makes the refusals and reads last.pt; the others get the same checkpoint (no
        # need for OUT to be visible from every node) or raise the same error.
        ckpt = dist.decide(claim_out)
        if ckpt is not None:
            cfg = resume_config(cfg, ckpt["train_config"])
            check_scst(cfg, _resumed_history(ckpt, files), ckpt["epoch"])
        data = dist.check(lambda: _prepare_checked(cfg, ckpt, files, dist.world))
        if ckpt is None:
            state = start(cfg, data, dist.device)
        else:
            state = resume(ckpt, cfg, files, dist.device)
            if dist.is_main:
                _complete_files(ckpt, state.best, files)
            if state.epoch >= cfg.epochs:
                info(f"{files.last} already has {state.epoch} epochs (asked for {cfg.epochs}): nothing to do")
                return {}
            info(f"resuming from {files.last} after epoch {state.epoch}")
        if dist.is_main:
            files.out.mkdir(parents=True, exist_ok=True)
        return run_epochs(state, data, cfg, files, dist)


def _prepare_checked(cfg: TrainConfig, ckpt: dict | None, files: RunFiles, world: int) -> TrainingData:
    """prepare(), and what this rank's store must satisfy: last.pt's features and vocabulary on --resume,
    at least one training image per process."""
    data = prepare(cfg)
    check_finetune(cfg, data.store)
    if ckpt is not None:
        _check_resumable(ckpt, data, files.last)
    if len(data.train_rows) < world:
        raise UserError(f"{len(data.train_rows)} training images cannot be shared by {world} processes")
    return data


def run_epochs(state: TrainingState, data: TrainingData, cfg: TrainConfig, files: RunFiles, dist: Dist) -> dict:
    """The loop: epochs state.epoch + 1 .. cfg.epochs, each trained, validated and (by rank 0) saved. Returns
    the last epoch's metrics."""
    device = dist.device
    train = Batches(
        data.store, data.captions, data.train_rows, cfg.batch_size, cfg.captions_per_image, device,
        rank=dist.rank, world=dist.world,
    )
    if fits_on_gpu(cfg, train, device):
        train.make_resident()
    val = validation_set(data, cfg, dist)
    if cfg.compile:
        compile_cell(state.model.decoder)
    phases = Phases(state.model, data, cfg, dist, state.epoch)
    info(
        f"fit: {len(data.train_rows)} train / {len(data.val_rows)} val images, vocabulary {len(data.vocab)}, "
        f"{count_parameters(state.model, trainable=True) / 1e6:.1f}M parameters trained, device {device}"
        + (", features resident on the GPU" if train.resident is not None else "")
        + (
            f", {dist.world} processes (global batch {cfg.batch_size * dist.world} images)"
            if dist.enabled
            else ""
        )
    )
    encoder_note(cfg, data.store)
    if cfg.scst_after is not None and cfg.scst_after < cfg.epochs and val.metric != "val_cider_d":
        warn(_SCST_BY_LOSS)
    if val.metric == "neg_train_loss":
        info(f"{data.store.path} has no validation images: model.pt will be the epoch with the lowest training loss")
    record: dict = {}
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
            save_epoch(files, state, data, cfg, is_best)
            info(_epoch_line(record, is_best, val.sample_name))
            if record["phase"] == "scst" and collapsing(state.records):
                warn(_collapse_line(state))
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
            info(f"self-critical training (CIDEr-D rewards, {self.cfg.scst_baseline} baseline) from this epoch on")
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
        info(
            f"{store.path} holds layer3 features and --finetune is not given: layer4 runs frozen on every batch, "
            "which is slower than training from a layer4 store (`extract --layer layer4`)"
        )
    elif cfg.finetune_after > 0:
        info(f"fine-tuning layer4 from epoch {cfg.finetune_after + 1} (the decoder alone before)")


def start(cfg: TrainConfig, data: TrainingData, device: torch.device) -> TrainingState:
    """A new run: the model initialised from `cfg.seed`, fresh optimizer and scheduler. On a layer3 store the
    feature scale is measured on layer4's output of the training sample: that is what the decoder reads."""
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(data.store, trainable=cfg.finetune is not None)
    stats = None
    if cfg.feature_norm != "none":
        encode = None
        if encoder is not None:
            encoder.to(device)
            encode = lambda x: run_encoder(encoder, x.to(device)).cpu()  # noqa: E731
        stats = feature_stats(data.store.features, data.train_rows, encode=encode)
    model = CaptionModel(build_model(cfg, len(data.vocab), stats), encoder).to(device)
    if cfg.embeddings != "random":  # initial word vectors (numpy-seeded: torch's RNG stream is untouched)
        from pipeline.embeddings import initial_vectors

        captions = [t for caps in data.captions.references(data.train_rows) for t in caps]
        decoder = model.decoder
        vectors = initial_vectors(cfg.embeddings, data.vocab, captions, decoder.cfg.embed_dim, cfg.seed, cfg.word2vec)
        info(vectors.summary())
        with torch.no_grad():
            decoder.embedding.weight.copy_(torch.from_numpy(vectors.matrix))
    freeze_embeddings(model.decoder, cfg)
    optimizer = make_optimizer(model, cfg.lr, cfg.encoder_lr)
    return TrainingState(model, optimizer, make_scheduler(optimizer, cfg))


def freeze_embeddings(model: Decoder, cfg: TrainConfig) -> None:
    """`--freeze-embeddings`: no gradient for the word vectors; Adam (fused too) skips a parameter whose .grad
    stays None, so it keeps no state for it and a resumed optimizer loads as saved."""
    if cfg.freeze_embeddings:
        model.embedding.weight.requires_grad_(False)


def resume(ckpt: dict, cfg: TrainConfig, files: RunFiles, device: torch.device) -> TrainingState:
    """The run saved in last.pt (`ckpt`), continued: weights, optimizer, scheduler, RNG and best epoch. Under
    torchrun every rank resumes from rank 0's copy of last.pt; rank 0 then completes what a kill left unwritten
    after it (`_complete_files`)."""
    model, _ = checkpoint.build_model(ckpt, files.last, layer_of(ckpt["store"]))
    if model.encoder is not None:
        model.encoder.requires_grad_(cfg.finetune is not None)
    model.to(device)
    freeze_embeddings(model.decoder, cfg)
    optimizer = make_optimizer(model, cfg.lr, cfg.encoder_lr)
    scheduler = make_scheduler(optimizer, cfg)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        checkpoint.restore_rng_state(ckpt["rng"])
        best = Best.from_dict(ckpt["best"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what mismatched states raise
        raise UserError(f"{files.last} is not a valid last.pt: {describe(e)}") from None
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


def fits_on_gpu(cfg: TrainConfig, batches: Batches, device: torch.device) -> bool:
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
    scst = f" scst reward {record['reward']:.3f} baseline {record['baseline']:.3f}" if "reward" in record else ""
    return (
        f"epoch {record['epoch']}:{scst} train loss {record['train_loss']:.3f} val loss {val}{cider} "
        f"{record['seconds']:.1f}s {record['samples_per_second']:,.0f} samples/s{' *best*' if is_best else ''}"
        f" | {sample_name}: {record['sample']}"
    )
