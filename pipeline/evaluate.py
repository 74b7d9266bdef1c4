"""`evaluate`: decode every image of a split once and score it with the coco-caption metrics.

On a layer3 store, layer4 runs first (the checkpoint's fine-tuned one, or the frozen one of the weights the
store recorded), through the same `decode_rows` as on a layer4 store.

`evaluate` returns the result (the `--out` JSON's content); printing it is the caller's business
(`cli.py` prints a table with `console.print_scores`).
"""

from __future__ import annotations

import json
import math

from pipeline import checkpoint
from pipeline.config import EvaluateConfig
from pipeline.console import info
from pipeline.data import CaptionIndex, validation_batches
from pipeline.decode import decode_rows
from pipeline.errors import UserError
from pipeline.files import write_text_atomic
from pipeline.loss import validation_loss
from pipeline.metrics import java_available, score
from pipeline.runtime import resolve_device
from pipeline.store import FeatureStore

__all__ = ["EvaluateConfig", "evaluate"]


def evaluate(cfg: EvaluateConfig) -> dict:
    """Decode the split with beam search and score it. Returns {"metrics", "captions", "details"}, also
    written to `cfg.out` when given."""
    if cfg.split not in ("test", "val", "train"):
        raise UserError(f"--split must be test or val, not {cfg.split!r}")
    if cfg.beam_size < 1:
        raise UserError("--beam-size must be at least 1")
    if cfg.meteor and not java_available():
        raise UserError("METEOR was asked for (--meteor) but needs Java, and no working `java` is on PATH")
    if cfg.out is not None and cfg.out.is_dir():
        raise UserError(f"--out {cfg.out} is a folder; give a file name such as scores.json")
    device = resolve_device(cfg.device)
    ckpt = checkpoint.load(cfg.model)
    store = FeatureStore(cfg.store)
    checkpoint.check_store(ckpt, store, cfg.model)
    rows = store.split_rows(cfg.split)
    if len(rows) == 0:
        raise UserError(f"{cfg.store} has no {cfg.split} images")
    # on a layer3 store: the checkpoint's fine-tuned layer4, or the frozen one of the recorded weights
    model, vocab = checkpoint.build_model(ckpt, cfg.model, store.layer)
    model.to(device)
    use_java = java_available() if cfg.meteor is None else cfg.meteor
    if not use_java:
        info("Java not found: METEOR left out; BLEU, ROUGE-L and CIDEr-D use a Python tokeniser, not PTB's")

    steps = checkpoint.max_steps(ckpt)
    decoded = decode_rows(model, store.features, rows, device, cfg.beam_size, steps, cfg.batch_size)
    captions = CaptionIndex.build(
        vocab, store.caption_text, store.caption_image, len(store), ckpt["train_config"]["max_len"]
    )
    refs = captions.references(rows)
    hyps = [vocab.decode(d.tokens) for d in decoded]
    metrics = score(hyps, refs, java=use_java)
    tokenizer = metrics.pop("tokenizer")
    loss = validation_loss(model, validation_batches(store, captions, rows, device))
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
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.out, json.dumps(result, indent=1))
    return result
