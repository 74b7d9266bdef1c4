"""What a fit run is built from before its first step: the store (`open_store`, `prepare`), the model
(`build_model`, `build_encoder`), the optimizer and its schedule, a new run (`start`) or a resumed one
(`resume_config`, `resume`), and whether the training features live on the GPU (`fits_on_gpu`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import TrainConfig, Word2VecConfig
from pipeline.data import Batches, CaptionIndex, FeatureStats, feature_stats
from pipeline.encoder import build_recorded, split_resnet50
from pipeline.errors import UserError, describe
from pipeline.model import CaptionModel, Decoder, DecoderConfig, run_encoder
from pipeline.store import FeatureStore, layer_of
from pipeline.train.run_folder import RunFiles, resumed_history
from pipeline.train.state import RESUMED_KEYS, SCST_KEYS, Best, TrainingData, TrainingState
from pipeline.vocab import Vocabulary

log = logging.getLogger(__name__)


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


def train_vocabulary(texts: list[str], caption_rows: np.ndarray, train_rows: np.ndarray, min_count: int) -> Vocabulary:
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
    # checkpoints from before word vectors, the warm-up and the rate schedule: as they trained, whatever this
    # command line says (random trained vectors, no warm-up, a constant rate)
    resumed.setdefault("embeddings", "random")
    resumed.setdefault("freeze_embeddings", False)
    resumed.setdefault("warmup_steps", 0)
    resumed.setdefault("lr_schedule", "constant")
    resumed.setdefault("init_from_grid", 0)  # and from before the state from the grid: zeros
    resumed.setdefault("init_drop", 0.0)
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
            init_from_grid=cfg.init_from_grid,
            init_drop=cfg.init_drop,
            **({"grid_cells": stats.cell_mean.shape[0]} if stats is not None and stats.cell_mean is not None else {}),
            dropout=cfg.dropout,
            gate=cfg.gate,
            feature_scale=1.0 / stats.rms if norm == "rms" and stats.rms > 0 else 1.0,
            feature_norm=norm == "channel",
        )
    )
    if norm == "channel":
        decoder.set_feature_stats(stats.mean, stats.std)
    if cfg.init_from_grid and stats is not None and stats.cell_mean is not None:
        decoder.set_grid_mean(stats.cell_mean)
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


def start(cfg: TrainConfig, data: TrainingData, device: torch.device) -> TrainingState:
    """A new run: the model initialised from `cfg.seed`, fresh optimizer and scheduler. On a layer3 store the
    feature scale is measured on layer4's output of the training sample: that is what the decoder reads."""
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(data.store, trainable=cfg.finetune is not None)
    stats = None
    if cfg.feature_norm != "none" or cfg.init_from_grid:
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
        log.info(vectors.summary())
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
    after it (`run_folder.complete_files`)."""
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
    return TrainingState(model, optimizer, scheduler, ckpt["epoch"], best, resumed_history(ckpt, files))


def check_resumable(ckpt: dict, data: TrainingData, path: Path) -> None:
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
    log.info(f"training features ({need / 2**30:.1f} GiB) do not fit on the GPU: reading them from the memory map")
    return False
