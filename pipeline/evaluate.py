"""`evaluate`: decode every image of a split once and score it with the coco-caption metrics.

On a layer3 store, layer4 runs first (the checkpoint's fine-tuned one, or the frozen one of the weights the
store recorded), through the same `decode_rows` as on a layer4 store.

`evaluate` returns the result (the `--out` JSON's content); printing it is the caller's business
(`cli.py` prints a table with the console module's `print_scores`). Everything that can be checked (the options,
Java, the model, the store, the `--out` file) is checked before the split is decoded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import EVAL_SPLITS, MAX_BEAM_SIZE, EvaluateConfig
from pipeline.data import CaptionIndex, validation_batches
from pipeline.decode import decode_rows
from pipeline.errors import UserError
from pipeline.files import check_writable_folder, remove_stale_temps, write_text_atomic
from pipeline.loss import validation_loss
from pipeline.metrics import java_available, java_problem, score
from pipeline.runtime import resolve_device
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)

__all__ = ["EvaluateConfig", "evaluate", "WRITTEN_BY"]

WRITTEN_BY = "captioner evaluate"  # details.written_by: how evaluate knows an --out file is its own


def evaluate(cfg: EvaluateConfig) -> dict:
    """Decode the split with beam search and score it. Returns {"metrics", "captions", "details"}, also
    written to `cfg.out` when given."""
    if cfg.split not in EVAL_SPLITS:
        raise UserError(f"--split must be {' or '.join(EVAL_SPLITS)}, not {cfg.split!r}")
    if not 1 <= cfg.beam_size <= MAX_BEAM_SIZE:
        raise UserError(f"--beam-size must be between 1 and {MAX_BEAM_SIZE}")
    use_java = _use_java(cfg.meteor)
    if cfg.out is not None:
        check_output(cfg.out)
    device = resolve_device(cfg.device)
    ckpt = checkpoint.load(cfg.model)
    store = FeatureStore(cfg.store)
    checkpoint.check_store(ckpt, store, cfg.model)
    rows = store.split_rows(cfg.split)
    if len(rows) == 0:
        raise UserError(f"{cfg.store} has no {cfg.split} images")
    # on a layer3 store: the checkpoint's fine-tuned layer4, or the frozen one of the recorded weights
    model, vocab = checkpoint.build_model(ckpt, cfg.model, store.layer)
    model.decoder.for_inference()  # its weights stay as loaded: decoding keeps its step weights
    model.to(device)

    steps = checkpoint.max_steps(ckpt)
    decoded = decode_rows(model, store.features, rows, device, cfg.beam_size, steps, cfg.batch_size)
    captions = CaptionIndex.build(
        vocab, store.caption_text, store.caption_image, len(store), ckpt["train_config"]["max_len"]
    )
    refs = captions.references(rows)
    hyps = [vocab.decode(d.tokens) for d in decoded]
    metrics = score(hyps, refs, java=cfg.meteor if use_java else False)
    loss = validation_loss(model, validation_batches(store, captions, rows, device))
    names = store.images
    result = {
        "metrics": {k: v for k, v in metrics.items() if k != "tokenizer"},
        "captions": [
            {"image": names[r], "caption": h, "references": ref} for r, h, ref in zip(rows, hyps, refs, strict=True)
        ],
        "details": {
            "split": cfg.split,
            "images": len(rows),
            "beam_size": cfg.beam_size,
            "tokenizer": metrics["tokenizer"],
            "loss": loss,
            "perplexity": math.exp(min(loss, 50)),
            "model": str(cfg.model),
            "store": str(cfg.store),
            "epoch": ckpt.get("epoch"),
            "written_by": WRITTEN_BY,
        },
    }
    if cfg.out is not None:
        write_text_atomic(cfg.out, json.dumps(result, indent=1))
    return result


def _use_java(meteor: bool | None) -> bool:
    """Whether to score with Java (PTB tokenizer, METEOR), saying so when it is left out."""
    plain = "METEOR left out; BLEU, ROUGE-L and CIDEr-D use a Python tokeniser, not PTB's"
    if meteor is False:
        log.info(f"--no-meteor: {plain}")
        return False
    if java_available():
        return True
    reason = java_problem() or "no working `java` on PATH"
    if meteor:
        raise UserError(f"METEOR was asked for (--meteor) but needs Java: {reason}")
    log.info(f"{reason}: {plain}")
    return False


def check_output(path: Path) -> None:
    """Before any work: `--out` can be written, and it replaces no file but one evaluate wrote itself."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as scores.json")
    check_writable_folder(path.parent, "the folder of --out")
    if (path.exists() or path.is_symlink()) and not written_by_evaluate(path):
        raise UserError(
            f"--out {path} exists and is not a file that evaluate wrote: it is left as it is; "
            "give another file name, or move it away"
        )
    remove_stale_temps(path)


def written_by_evaluate(path: Path, limit: int = 1 << 30) -> bool:
    """Whether `path` is a regular file holding evaluate's JSON (details.written_by == WRITTEN_BY)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return False
        with open(path, encoding="utf-8") as f:
            if f.read(1) != "{":
                return False
            f.seek(0)
            data = json.load(f)
        return data["details"]["written_by"] == WRITTEN_BY
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, not UTF-8 or JSON, another shape
        return False
