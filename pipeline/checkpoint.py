"""The checkpoint format: what `model.pt` and `last.pt` hold, saving them atomically, loading them safely,
rebuilding the decoder from one, and the RNG state that a resumed run continues with.

A checkpoint is a dict of tensors and plain values, loadable with `torch.load(path, weights_only=True)`:

    format        FORMAT
    model         the decoder's state_dict (CPU tensors)
    model_config  DecoderConfig as a dict: the decoder is rebuilt with DecoderConfig(**model_config)
    train_config  TrainConfig as a dict
    vocab         the words in id order
    store         the encoder provenance of the training store (weights, transform, dtype, layer...)
    epoch, best, metrics
    last.pt also: optimizer, scheduler, rng (and history: the metrics of every epoch so far)
    fine-tuned runs (`fit --finetune layer4`, from a layer3 store) also:
    finetune      FINETUNE: what was fine-tuned, from which stored stage, with which BatchNorm
    layer4        the fine-tuned layer4's state_dict (CPU tensors; FrozenBatchNorm2d buffers, no
                  num_batches_tracked)

A checkpoint trained on a layer3 store without --finetune holds no layer4: its layer4 is the frozen one of
the weights its `store` provenance records. Other entries are kept as they are: `model_state(..., extra=)`
adds them and `load` returns them. Code that only loads a model imports this module, not training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.encoder import build_recorded, layer4_head, split_resnet50
from pipeline.errors import UserError, describe
from pipeline.files import atomic_write, read_torch
from pipeline.model import CaptionModel, Decoder, DecoderConfig
from pipeline.store import FeatureStore, encoder_diffs
from pipeline.vocab import Vocabulary

FORMAT = 1
# key -> type every checkpoint must hold it as; what --resume needs on top
MODEL_KEYS = {
    "format": int,
    "model": dict,
    "model_config": dict,
    "train_config": dict,
    "vocab": list,
    "store": dict,
    "epoch": int,
    "best": dict,
    "metrics": dict,
}
RESUME_KEYS = {"optimizer": dict, "scheduler": dict, "rng": dict}
# train_config entries that loading a model relies on
TRAIN_CONFIG_KEYS = ("max_len", "min_word_count")
# what a fine-tuned checkpoint says about its encoder part (the `finetune` entry)
FINETUNE = {"layer": "layer4", "input_layer": "layer3", "batchnorm": "frozen (statistics and affine)"}
FINETUNE_KEYS = {"finetune": dict, "layer4": dict}
# store entries (the training store's provenance) that generate rebuilds the encoder from
STORE_KEYS = ("encoder", "weights", "weights_sha256", "transform", "dtype")


def model_state(
    model: Decoder,
    vocab: Vocabulary,
    train_config: dict,
    store: FeatureStore,
    epoch: int,
    best: dict,
    metrics: dict,
    extra: dict | None = None,
) -> dict:
    """The content of model.pt (last.pt adds `training_state`). `extra`: further entries, kept as they are."""
    return {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.cfg.to_dict(),
        "train_config": dict(train_config),
        "vocab": vocab.to_list(),
        "store": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in store.identity().items()},
        "epoch": epoch,
        "best": dict(best),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    } | (extra or {})


def training_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, records: list[dict]
) -> dict:
    """What last.pt holds beyond model.pt so that --resume continues exactly: optimizer, scheduler, RNG, and
    `history`, the metrics of every epoch so far (what metrics.jsonl is rebuilt from)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "history": [dict(r) for r in records],
    }


def model_only(ckpt: dict) -> dict:
    """A last.pt's content without the training state: what model.pt holds."""
    return {k: v for k, v in ckpt.items() if k not in (*RESUME_KEYS, "history")}


def save(state: dict, path: str | Path) -> None:
    """Write atomically (pipeline.files.atomic_write): a kill or a full disk at any moment leaves the
    previous file whole, and no temp file behind except after a kill -9 (removed by the next run). Ctrl-C
    during the write is a KeyboardInterrupt and a write error a UserError, as anywhere else."""
    with atomic_write(path) as f:
        out = _DeferredErrors(f)
        torch.save(state, out)
        if out.error is not None:
            raise out.error


class _DeferredErrors:
    """The file torch.save writes to. torch's C++ writer turns an exception raised in `write` (Ctrl-C, EFBIG
    on a full disk) into an opaque RuntimeError ("unexpected pos"); this keeps it, skips the rest of the
    writes, and `save` raises it as itself once torch.save has returned."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: BaseException | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self.f.write(data)
            except BaseException as e:  # KeyboardInterrupt included: raised by `save`, after torch.save
                self.error = e
        return memoryview(data).nbytes

    def flush(self) -> None:
        if self.error is None:
            self.f.flush()


def load(path: str | Path, resume: bool = False) -> dict:
    """Read a checkpoint written by fit, with `weights_only=True` (a checkpoint never runs code), and check
    its keys: anything else (another project's .pt, a pickle, a zip, an empty file, model.pt given where
    last.pt is needed with resume=True) is a UserError that says what the file is not."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is not a checkpoint file")
    ckpt = read_torch(path, "checkpoint", "a checkpoint written by fit")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by fit")
    _check_types(ckpt, MODEL_KEYS, path, "a checkpoint written by fit")
    for key in TRAIN_CONFIG_KEYS:
        if not isinstance(ckpt["train_config"].get(key), int):
            raise UserError(f"{path} is not a valid checkpoint: train_config lacks {key}")
    for key in STORE_KEYS:
        if not isinstance(ckpt["store"].get(key), str):
            raise UserError(f"{path} is not a valid checkpoint: the store provenance lacks {key}")
    if resume:
        _check_types(ckpt, RESUME_KEYS, path, "a last.pt with the training state --resume needs")
    if "finetune" in ckpt or "layer4" in ckpt:
        _check_types(ckpt, FINETUNE_KEYS, path, "a valid fine-tuned checkpoint")
    return ckpt


def finetuned(ckpt: dict) -> bool:
    """Whether the checkpoint holds a fine-tuned layer4 (its features come from its own layer4)."""
    return "finetune" in ckpt


def finetune_state(model: CaptionModel) -> dict:
    """The entries a fine-tuned run's checkpoints hold beyond the decoder (`model_state(..., extra=)`)."""
    assert model.encoder is not None
    return {
        "finetune": dict(FINETUNE),
        "layer4": {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()},
    }


def _check_types(ckpt: dict, keys: dict[str, type], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not {what} (it lacks {', '.join(missing)})")
    wrong = [k for k, kind in keys.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if wrong:
        raise UserError(f"{path} is not {what} ({', '.join(wrong)} of the wrong type)")


def build_decoder(ckpt: dict, path: str | Path = "checkpoint") -> tuple[Decoder, Vocabulary]:
    """The decoder in eval mode, on the CPU, and its vocabulary. A checkpoint whose parts do not fit
    together (a config, weights or vocabulary of another model) is a UserError naming `path`."""
    try:
        vocab = Vocabulary.from_list(ckpt["vocab"])
        cfg = DecoderConfig(**ckpt["model_config"])
        if cfg.vocab_size != len(vocab):
            raise ValueError(f"{cfg.vocab_size} output words for a vocabulary of {len(vocab)}")
        model = Decoder(cfg)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # what mismatched parts raise
        raise UserError(f"{path} is not a valid checkpoint: {describe(e)}") from None
    model.eval()
    return model, vocab


def build_layer4(
    ckpt: dict, path: str | Path = "checkpoint", resnet: nn.Module | None = None, trainable: bool = False
) -> nn.Module:
    """The layer4 that turns layer3 features into this checkpoint's decoder inputs: its fine-tuned weights, or
    (trained without --finetune) ResNet50's layer4 with the weights its store recorded, frozen (taken from
    `resnet` when the caller has built that model already). Eval mode, CPU."""
    if finetuned(ckpt):
        head = layer4_head()
        try:
            head.load_state_dict(ckpt["layer4"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a valid checkpoint: its layer4 does not load ({describe(e)})") from None
    else:
        _, head = split_resnet50(resnet if resnet is not None else build_recorded(ckpt["store"])[0])
    head.eval()
    head.requires_grad_(trainable)
    return head


def build_model(
    ckpt: dict, path: str | Path, input_layer: str, resnet: nn.Module | None = None
) -> tuple[CaptionModel, Vocabulary]:
    """The decoder, with the layer4 to run before it on features of `input_layer` (pipeline.store.layer_of):
    none on layer4 features, `build_layer4` on layer3 ones. A fine-tuned checkpoint on layer4 features is a
    UserError: those features came from the original layer4, not from the one it trained. Eval mode, CPU."""
    _check_input_layer(ckpt, path, input_layer)
    decoder, vocab = build_decoder(ckpt, path)
    if input_layer == "layer4":
        return CaptionModel(decoder).eval(), vocab
    return CaptionModel(decoder, build_layer4(ckpt, path, resnet)).eval(), vocab


def _check_input_layer(ckpt: dict, path: str | Path, input_layer: str) -> None:
    if input_layer == "layer4" and finetuned(ckpt):
        raise UserError(
            f"{path} fine-tuned ResNet50's layer4, so it needs layer3 features: a layer4 store's features come "
            "from the original layer4, not from its own. Make a layer3 store with "
            "`cli.py extract --layer layer3` (the same --weights) and use that"
        )


def max_steps(ckpt: dict) -> int:
    """Words a caption may have when decoding with this model: its training captions' length without <start>."""
    return int(ckpt["train_config"]["max_len"]) - 1


def check_store(ckpt: dict, store: FeatureStore, path: str | Path) -> None:
    """Whether evaluate can run the model on this store: features made the way its training features were, up
    to the stage stored when it did not fine-tune layer4 (a layer4 store, or a layer3 store with the same
    weights' layer4 run on it, then give the same features). A fine-tuned model needs a layer3 store."""
    _check_input_layer(ckpt, path, store.layer)
    check_same_encoder(ckpt, store, path, any_layer=not finetuned(ckpt))


def check_same_encoder(ckpt: dict, store: FeatureStore, path: str | Path, any_layer: bool = False) -> None:
    """A model only makes sense on features made the way its training features were (any_layer: see
    `check_store`)."""
    diffs = encoder_diffs(ckpt["store"], store.identity(), any_layer=any_layer)
    if diffs:
        raise UserError(
            f"{store.path} was made differently from the store {path} was trained on ({', '.join(diffs)} differ)"
        )


def rng_state() -> dict:
    """torch's CPU (and CUDA) generator states. numpy's is not needed: batches draw from generators
    seeded by (seed, epoch) alone (pipeline/data.py)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
