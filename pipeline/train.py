"""`fit`: train the decoder alone from the memory-mapped store; checkpoints, resume, metrics."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.console import info, progress, warn
from pipeline.data import Batches, CaptionIndex
from pipeline.decode import decode_rows
from pipeline.errors import UserError, describe
from pipeline.model import Decoder, DecoderConfig, attention_penalty, count_parameters
from pipeline.runtime import autocast, resolve_device
from pipeline.store import FeatureStore, encoder_diffs
from pipeline.vocab import MAX_LEN, Vocabulary

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    store: str = "cache/features.h5"
    out: str = "cache"
    epochs: int = 50
    batch_size: int = 32  # images per batch (each with captions_per_image captions)
    lr: float = 1e-3
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    min_word_count: int = 5
    captions_per_image: int = 1
    max_len: int = MAX_LEN
    grad_clip: float = 5.0  # 0 disables
    lr_step: int = 0  # StepLR step size in epochs; 0 = constant lr (the report's 100 never fires in 50)
    lr_gamma: float = 0.1
    amp: bool | None = None  # bf16 autocast; None: on CUDA only (on CPU it is opt-in: not every CPU has bf16)
    compile: bool = False
    resident: str = "auto"  # keep training features on the GPU: auto | yes | no
    # Show, Attend and Tell options (see pipeline/model.py); attention_penalty is its lambda
    init_from_features: bool = False
    dropout: float = 0.0
    gate: bool = False
    attention_penalty: float = 0.0
    feature_scale: bool = True  # scale features to RMS 1 (see DecoderConfig.feature_scale)
    # validation decoding (CIDEr-D) for choosing model.pt; 0 images = choose by validation loss
    val_decode_images: int = 1000
    val_beam_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Run:
    """Everything fit builds before the first step."""

    cfg: TrainConfig
    store: FeatureStore
    vocab: Vocabulary
    captions: CaptionIndex
    train_rows: np.ndarray
    val_rows: np.ndarray
    device: torch.device
    texts: list[str] = field(default_factory=list)  # every caption, read from the store once
    owners: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))


def _atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temp file, fsync, rename: a kill at any moment leaves the old file intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors all mean "not a checkpoint of ours"
        raise UserError(f"cannot read checkpoint {path}: {describe(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by fit")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[Decoder, Vocabulary]:
    model = Decoder(DecoderConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, Vocabulary.from_list(ckpt["vocab"])


def _open_store(cfg: TrainConfig) -> FeatureStore:
    store = FeatureStore(cfg.store)
    if not store.complete:
        pending = int((store.status == 0).sum())
        raise UserError(f"{cfg.store} is incomplete ({pending} images pending): rerun the same extract to finish it")
    if len(store.caption_image) == 0:
        raise UserError(f"{cfg.store} holds no captions")
    if len(store.split_rows("train")) == 0:
        raise UserError(f"{cfg.store} has no training images (no image in the train split)")
    return store


def prepare(cfg: TrainConfig, vocab_words: list[str] | None = None) -> Run:
    """Open the store, build (or reuse) the vocabulary from the train split, index the captions."""
    for name, value, low in (
        ("epochs", cfg.epochs, 1),
        ("batch-size", cfg.batch_size, 1),
        ("captions-per-image", cfg.captions_per_image, 1),
        ("min-word-count", cfg.min_word_count, 1),
    ):
        if value < low:
            raise UserError(f"--{name} must be at least {low}")
    if cfg.lr <= 0:
        raise UserError("--lr must be positive")
    device = resolve_device(cfg.device)
    store = _open_store(cfg)
    texts, owners = store.caption_text, store.caption_image
    train_rows, val_rows = store.split_rows("train"), store.split_rows("val")
    if vocab_words is None:
        vocab = train_vocabulary(texts, owners, train_rows, cfg.min_word_count)
    else:
        vocab = Vocabulary.from_list(vocab_words)
    captions = CaptionIndex.build(vocab, texts, owners, len(store), cfg.max_len)
    return Run(cfg, store, vocab, captions, train_rows, val_rows, device, texts, owners)


def train_vocabulary(texts: list[str], owners: np.ndarray, train_rows: np.ndarray, min_count: int) -> Vocabulary:
    """The vocabulary of the captions of the training images only."""
    is_train = np.zeros(int(max(owners.max(initial=-1), train_rows.max(initial=-1))) + 1, dtype=bool)
    is_train[train_rows] = True
    return Vocabulary.build((t for t, o in zip(texts, owners, strict=True) if is_train[o]), min_count)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused implementation where this torch has it (CPU and CUDA): the same update in one pass
    over the parameters instead of a dozen (measured: 860 -> 604 ms per CPU batch at 18.5k words)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model: Decoder, optimizer: torch.optim.Optimizer, batch, cfg: TrainConfig, loss_fn=None) -> torch.Tensor:
    """One optimisation step on a batch; returns the (detached) masked loss. fit and the benchmarks use it."""
    device = batch.features.device
    with autocast(device, cfg.amp):
        total, loss = (loss_fn or _loss)(model, batch.features, batch.tokens, cfg.attention_penalty)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


def _loss(
    model: Decoder, features: torch.Tensor, tokens: torch.Tensor, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked cross-entropy (and the SAT penalty). The output layer, the largest matmul at a real
    vocabulary size, runs on the non-<pad> steps only, and the recurrence stops for each image when its
    captions end: the same loss as masking full (B, G, T, V) logits."""
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    # Images by decreasing caption length, so that step t runs only the images that still have words:
    # the loss is a mean over tokens, so the order does not change it.
    lengths = (targets != 0).sum(-1).amax(-1)  # (B,) steps each image needs
    order = torch.argsort(lengths, descending=True, stable=True)
    features, inputs, targets, lengths = features[order], inputs[order], targets[order], lengths[order]
    steps = torch.arange(inputs.shape[-1], device=lengths.device)
    active = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()
    hidden, alphas = model.recurrence(features, inputs, active)
    keep = targets != 0
    loss = torch.nn.functional.cross_entropy(model.head(hidden[keep]).float(), targets[keep])
    total = loss + penalty * attention_penalty(alphas, targets) if penalty > 0 else loss
    return total, loss


@torch.no_grad()
def validation_loss(model: Decoder, batches: Batches, device: torch.device, amp: bool | None = None) -> float:
    """Mean masked cross-entropy per token over the fixed validation captions."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches.iterate(None, 0):
        with autocast(device, amp):
            _, loss = _loss(model, batch.features, batch.tokens, 0.0)
        n = int((batch.tokens[..., 1:] != 0).sum())
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


def _check_resume(ckpt: dict, run: Run, path: Path) -> None:
    ident = run.store.identity()
    theirs = ckpt.get("store", {})
    diffs = encoder_diffs(theirs, ident)
    if diffs:
        raise UserError(
            f"{path} was trained on a store made differently ({', '.join(diffs)} differ from {run.cfg.store})"
        )
    rebuilt = train_vocabulary(run.texts, run.owners, run.train_rows, ckpt["train_config"]["min_word_count"])
    if rebuilt.to_list() != ckpt["vocab"]:
        raise UserError(f"{path} has a vocabulary that does not match the captions of {run.cfg.store}")


def _resident(cfg: TrainConfig, batches: Batches, device: torch.device) -> bool:
    if device.type != "cuda" or cfg.resident == "no":
        return False
    feats = batches.store.features
    need = len(batches.rows) * int(np.prod(feats.shape[1:])) * feats.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if cfg.resident == "yes" or need < 0.6 * free:
        return True
    info(f"training features ({need / 2**30:.1f} GiB) do not fit on the GPU: reading them from the memory map")
    return False


def fit(cfg: TrainConfig) -> dict:
    """Train for `cfg.epochs` epochs in total (resumed epochs included). Returns the last epoch's metrics."""
    out = Path(cfg.out)
    last_path, best_path, metrics_path = out / "last.pt", out / "model.pt", out / "metrics.jsonl"
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(last_path)
        run = prepare(cfg, vocab_words=ckpt["vocab"])
        _check_resume(ckpt, run, last_path)
        saved = ckpt["train_config"]
        # What defines the model and its data comes from the checkpoint; epochs, device and out from now.
        for key in (
            "min_word_count",
            "captions_per_image",
            "max_len",
            "init_from_features",
            "dropout",
            "gate",
            "attention_penalty",
            "feature_scale",
            "seed",
            "batch_size",
            "lr",
            "grad_clip",
            "lr_step",
            "lr_gamma",
            "val_decode_images",  # how model.pt is chosen: CIDEr-D and -loss scores must not be compared
            "val_beam_size",
        ):
            setattr(cfg, key, saved[key])
    else:
        if last_path.exists():
            try:
                done = load_checkpoint(last_path).get("epoch", "?")
            except UserError:
                done = "an unreadable checkpoint of"
            raise UserError(
                f"{last_path} holds an earlier run ({done} epochs): pass --resume to continue it, "
                "or --out DIR to start a new one elsewhere"
            )
        run = prepare(cfg)
        metrics_path.unlink(missing_ok=True)  # left by a run killed before its first last.pt: not this run's
    device = run.device
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        scale = float(ckpt["model_config"].get("feature_scale", 1.0))
    else:
        scale = _feature_scale(run) if cfg.feature_scale else 1.0
    model_cfg = DecoderConfig(
        vocab_size=len(run.vocab),
        init_from_features=cfg.init_from_features,
        dropout=cfg.dropout,
        gate=cfg.gate,
        feature_scale=scale,
    )
    model = Decoder(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(cfg.lr_step, 1), gamma=cfg.lr_gamma if cfg.lr_step > 0 else 1.0
    )
    start_epoch, best = 0, {"metric": "", "score": -math.inf, "epoch": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        _set_rng_state(ckpt["rng"])
        _truncate_metrics(metrics_path, start_epoch)
        if start_epoch >= cfg.epochs:
            info(f"{last_path} already has {start_epoch} epochs (asked for {cfg.epochs}): nothing to do")
            return {}
        info(f"resuming from {last_path} after epoch {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)

    train = Batches(run.store, run.captions, run.train_rows, cfg.batch_size, cfg.captions_per_image, device)
    val = Batches(
        run.store, run.captions, run.val_rows, max(cfg.batch_size, 64), 5, device
    )  # 64 x 5 captions: ~300 MB of logits at 18k words
    if _resident(cfg, train, device):
        train.make_resident()
    loss_fn = torch.compile(_loss) if cfg.compile else _loss
    info(
        f"fit: {len(run.train_rows)} train / {len(run.val_rows)} val images, vocabulary {len(run.vocab)}, "
        f"{count_parameters(model) / 1e6:.1f}M parameters, device {device}"
        + (", features resident on the GPU" if train.resident is not None else "")
    )
    val_decode = run.val_rows[: cfg.val_decode_images] if cfg.val_decode_images > 0 else run.val_rows[:0]
    val_refs = run.captions.texts(run.texts, run.owners, val_decode)  # read once, not every epoch
    sample_row = int(run.val_rows[0]) if len(run.val_rows) else int(run.train_rows[0])
    sample_name = run.store.images[sample_row]
    record: dict = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        samples = 0
        with progress(len(train), f"epoch {epoch}/{cfg.epochs}", unit="batch") as advance:
            for batch in train.iterate(epoch, cfg.seed):
                loss_sum += train_step(model, optimizer, batch, cfg, loss_fn)
                samples += batch.tokens.shape[0] * batch.tokens.shape[1]
                advance(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        scheduler.step()
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / len(train),
            "val_loss": validation_loss(model, val, device, cfg.amp) if len(run.val_rows) else float("nan"),
            "seconds": seconds,
            "samples_per_second": samples / seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
        score_name, score = "neg_val_loss", -record["val_loss"]
        if len(val_decode):
            from pipeline.metrics import cider_d

            model.eval()
            decoded = decode_rows(model, run.store.features, val_decode, device, cfg.val_beam_size)
            record["val_cider_d"] = cider_d([run.vocab.decode(d.tokens) for d in decoded], val_refs)
            score_name, score = "val_cider_d", record["val_cider_d"]
        model.eval()
        sample = decode_rows(model, run.store.features, np.array([sample_row]), device, beam_size=1)[0]
        record["sample"] = run.vocab.decode(sample.tokens)
        # Ties (CIDEr-D is often 0 for the first epochs) go to the lower validation loss.
        key = (score, -record["val_loss"])
        is_best = key > (best["score"], best.get("tiebreak", -math.inf))
        if is_best:
            best = {"metric": score_name, "score": score, "tiebreak": -record["val_loss"], "epoch": epoch}
        _append_metrics(metrics_path, record)
        state = _checkpoint(model, run, cfg, epoch, best, record)
        if is_best:
            _atomic_save(state, best_path)
        _atomic_save(
            state | {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            last_path,
        )
        cider = f" val CIDEr-D {record['val_cider_d']:.3f}" if "val_cider_d" in record else ""
        info(
            f"epoch {epoch}: train loss {record['train_loss']:.3f} val loss {record['val_loss']:.3f}{cider} "
            f"{seconds:.1f}s {record['samples_per_second']:,.0f} samples/s{' *best*' if is_best else ''}"
            f" | {sample_name}: {record['sample']}"
        )
    return record


def _feature_scale(run: Run, sample: int = 256) -> float:
    """1 / RMS of (up to) `sample` training images' features, evenly spaced over the split."""
    rows = np.sort(
        run.train_rows[np.linspace(0, len(run.train_rows) - 1, min(sample, len(run.train_rows))).astype(int)]
    )
    feats = np.asarray(run.store.features[np.unique(rows)], dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(feats))))
    return 1.0 / rms if rms > 0 else 1.0


def _checkpoint(model: Decoder, run: Run, cfg: TrainConfig, epoch: int, best: dict, record: dict) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "train_config": cfg.to_dict(),
        "vocab": run.vocab.to_list(),
        "store": {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run.store.identity().items()
        },
        "epoch": epoch,
        "best": best,
        "metrics": {k: v for k, v in record.items() if isinstance(v, (int, float, str))},
    }


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop lines of epochs after the checkpoint (written before a kill that came before last.pt)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= last_epoch:
                keep.append(line)
        except json.JSONDecodeError:
            warn(f"{path}: dropped an unreadable line")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
