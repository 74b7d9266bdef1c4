"""Section `fit50` (opt-in, for a GPU: `--only fit50 --device cuda`): the report's whole run, timed end to end
through the real command. A Flickr30k-shaped float16 layer4 store (the Karpathy file's 31,014 images in their
own splits, their real captions, random features) is written, then `cli.py fit --epochs 50` runs on it as a
user would run it: a subprocess, its defaults (batch 32, bf16 autocast and the features resident on a GPU),
greedy decoding of the 1,014 validation images and their CIDEr-D after every epoch, checkpoints every epoch.

The wall time includes everything fit does (start-up, the store read into memory, validation, checkpoints);
the per-epoch training seconds come from its metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from benchmarks.common import ROOT, Context, Skipped, Table, flickr, make_store


def _first(splits: list[str], split: str, k: int) -> list[int]:
    return [i for i, s in enumerate(splits) if s == split][:k]


def run(ctx: Context) -> list[Table]:
    if ctx.device.type == "cpu" and not ctx.quick:
        raise Skipped("sized for a GPU (50 Flickr30k-scale epochs: days on a CPU); --device cuda, or --quick")
    captions, splits = flickr().captions, flickr().splits
    if ctx.quick:  # the first 48 train, 8 val and 8 test images: one step an epoch, a validation, a test split
        keep = [i for s, k in (("train", 48), ("val", 8), ("test", 8)) for i in _first(splits, s, k)]
        captions, splits = [captions[i] for i in keep], [splits[i] for i in keep]
    n = len(captions)
    epochs = int(os.environ.get("CAPTIONER_FIT50_EPOCHS") or ctx.pick(1, 50))
    extra = shlex.split(os.environ.get("CAPTIONER_FIT50_ARGS", ""))  # e.g. "--batch-size 256"
    if ctx.quick and not extra:
        extra = ["--decoder", "tiny", "--batch-size", "48"]
    store = ctx.workdir / "flickr30k-layer4.h5"
    ctx.log(f"writing a layer4 store of {n} images (random features, real captions and splits)")
    t0 = time.perf_counter()
    make_store(store, captions[:n], splits=splits[:n], repeat_block=True)
    write_s = time.perf_counter() - t0
    out = ctx.workdir / "fit50"
    cmd = [sys.executable, "cli.py", "fit", "--store", str(store), "--out", str(out), "--epochs", str(epochs),
           "--device", ctx.device.type, *extra]  # fmt: skip
    ctx.log(" ".join(cmd))
    # CAPTIONER_FIT50_BUDGET=SECONDS: Ctrl-C fit at that point (it keeps the finished epochs), and project
    budget = float(os.environ.get("CAPTIONER_FIT50_BUDGET") or "inf")
    log = (ctx.workdir / "fit50.log").open("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(timeout=None if budget == float("inf") else budget)
    except subprocess.TimeoutExpired:
        ctx.log(f"stopping fit after {budget:.0f} s (Ctrl-C)")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    wall = time.perf_counter() - t0
    log.seek(0)
    output = log.read()
    print(output[-3000:], file=sys.stderr)
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"fit failed ({proc.returncode}): {output[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["seconds"] for r in records)
    counts = {s: splits[:n].count(s) for s in ("train", "val", "test")}
    row = {
        "images": f"{counts['train']:,} train / {counts['val']:,} val",
        "args": " ".join(extra) or "(defaults)",
        "epochs": len(records),
        "wall_s": wall,
        "projected_s": wall * epochs / len(records),
        "train_s": train_s,
        "other_s": wall - train_s,
        "epoch_train_s": train_s / len(records),
        "samples_per_s": sum(r["samples_per_second"] for r in records) / len(records),
        "final_val_loss": records[-1]["val_loss"],
        "store_write_s": write_s,
    }
    return [
        Table(
            f"fit50: `cli.py fit --epochs {epochs}` end to end on a Flickr30k-shaped layer4 store, {ctx.device.type}",
            [
                ("images", "images", ""),
                ("args", "fit options", ""),
                ("epochs", "epochs", "d"),
                ("wall_s", "wall time (whole command)", "dur"),
                ("projected_s", f"{epochs} epochs (projected when stopped early)", "dur"),
                ("train_s", "of which training passes", "dur"),
                ("other_s", "start-up, validation, checkpoints", "dur"),
                ("epoch_train_s", "training pass per epoch", "dur"),
                ("samples_per_s", "captions/s", ",.0f"),
            ],
            [row],
            [
                "fit's defaults: batch 32, 1 caption per image per epoch, the report's decoder, bf16 autocast on CUDA, "
                "features resident on the GPU when they fit; validation (loss, greedy captions, CIDEr-D) every epoch.",
                "random float16 features: the time is the real one, the scores are not.",
            ],
        )
    ]
