"""`evaluate`: decode every image of a split once and score it with the coco-caption metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from pipeline.console import info, out
from pipeline.data import Batches, CaptionIndex
from pipeline.decode import decode_rows
from pipeline.errors import UserError
from pipeline.metrics import java_available, score
from pipeline.runtime import resolve_device
from pipeline.store import FeatureStore, encoder_diffs
from pipeline.train import load_checkpoint, model_from_checkpoint, validation_loss

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


@dataclass
class EvaluateConfig:
    model: Path = Path("cache/model.pt")
    store: Path = Path("cache/features.h5")
    split: str = "test"
    beam_size: int = 3
    out: Path | None = None
    device: str = "auto"
    meteor: bool | None = None  # None: when Java is there; True: required; False: never (no Java at all)
    batch_size: int = 128


def check_store_matches(ckpt: dict, store: FeatureStore, model_path: Path) -> None:
    """A model only makes sense on features made the way its training features were."""
    theirs, ours = ckpt["store"], store.identity()
    diffs = encoder_diffs(theirs, ours)
    if diffs:
        raise UserError(
            f"{store.path} was made with other {', '.join(diffs)} than the store {model_path} was trained on"
        )


def evaluate(cfg: EvaluateConfig) -> dict:
    if cfg.split not in ("test", "val", "train"):
        raise UserError(f"--split must be test or val, not {cfg.split!r}")
    if cfg.beam_size < 1:
        raise UserError("--beam-size must be at least 1")
    if cfg.meteor and not java_available():
        raise UserError("METEOR was asked for (--meteor) but needs Java, and no working `java` is on PATH")
    if cfg.out is not None and cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} is a folder; give a file name such as scores.json")
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.model)
    model, vocab = model_from_checkpoint(ckpt)
    model.to(device)
    store = FeatureStore(cfg.store)
    check_store_matches(ckpt, store, cfg.model)
    rows = store.split_rows(cfg.split)
    if len(rows) == 0:
        raise UserError(f"{cfg.store} has no {cfg.split} images")
    use_java = java_available() if cfg.meteor is None else cfg.meteor
    if not use_java:
        info("Java not found: METEOR left out; BLEU, ROUGE-L and CIDEr-D use a Python tokeniser, not PTB's")

    max_steps = int(ckpt["train_config"].get("max_len", 20)) - 1
    decoded = decode_rows(model, store.features, rows, device, cfg.beam_size, max_steps, cfg.batch_size)
    texts, owners = store.caption_text, store.caption_image
    captions = CaptionIndex.build(vocab, texts, owners, len(store), int(ckpt["train_config"].get("max_len", 20)))
    refs = captions.texts(texts, owners, rows)
    hyps = [vocab.decode(d.tokens) for d in decoded]
    metrics = score(hyps, refs, java=use_java)
    tokenizer = metrics.pop("tokenizer")
    loss = validation_loss(model, Batches(store, captions, rows, 64, 5, device), device)
    names = store.images
    result = {
        "metrics": metrics,
        "captions": [
            {"image": names[r], "caption": h, "references": ref} for r, h, ref in zip(rows, hyps, refs, strict=True)
        ],
        "details": {
            "split": cfg.split,
            "images": len(rows),
            "beam_size": cfg.beam_size,
            "tokenizer": tokenizer,
            "loss": loss,
            "perplexity": math.exp(min(loss, 50)),
            "model": str(cfg.model),
            "store": str(cfg.store),
            "epoch": ckpt.get("epoch"),
        },
    }
    _print_table(result)
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfg.out.with_name(cfg.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(cfg.out)
        info(f"wrote {cfg.out}")
    return result


def _print_table(result: dict) -> None:
    d = result["details"]
    table = Table(title=f"{d['split']} split: {d['images']} images, beam {d['beam_size']}, epoch {d['epoch']}")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name in METRIC_NAMES:
        if name in result["metrics"]:
            table.add_row(name, f"{result['metrics'][name]:.4f}")
    table.add_row("loss (masked, per token)", f"{d['loss']:.4f}")
    table.add_row("perplexity", f"{d['perplexity']:.2f}")
    table.caption = f"tokenizer: {d['tokenizer']}"
    out.print(table)
