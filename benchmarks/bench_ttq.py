"""Section `ttq` (opt-in; for a GPU: `--only ttq --device cuda`): time to quality, as MLPerf measures training.

The target is the best validation loss of fit's default run (batch 32, lr 1e-3) over `CAPTIONER_TTQ_EPOCHS`
epochs. Each other run (a larger batch, a rate rule, a warm-up) races to it through the real command, on the
same Flickr30k-shaped store as `fit50` (the Karpathy file's images in their own splits, real captions, random
float16 features: the language model's loss is comparable across runs, CIDEr-D is not). The wall clock runs
from the command's start (imports, store read, every validation and checkpoint included) to the moment the
epoch that reaches the target is written to metrics.jsonl.

Runs: `CAPTIONER_TTQ_RUNS` = "LABEL=fit options;LABEL=fit options;..." (default: RUNS below).
`CAPTIONER_TTQ_MAX_EPOCHS`, `CAPTIONER_TTQ_RACE_BUDGET`: the other runs' limits in epochs (default 4x the first
run's) and seconds (default `CAPTIONER_TTQ_BUDGET`, the first run's); they stop at the target.
`CAPTIONER_TTQ_IMAGES`: the store's first N images of the Karpathy file (default: all 31,014), for a CPU-sized
race (the first 8,000 are about Flickr8k's size).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, Context, Table, flickr, make_store

BASE_LR, BASE_BATCH = 1e-3, 32
# (label, fit options): the baseline first; then the rate rules at 256 and 1024 images a batch
RUNS = {
    "batch 32 (fit's default)": "--batch-size 32",
    "256, same lr": "--batch-size 256",
    "256, lr x sqrt(8), warm-up 100": f"--batch-size 256 --lr {BASE_LR * math.sqrt(8):.2e} --warmup-steps 100",
    "256, lr x 8, warm-up 200": f"--batch-size 256 --lr {BASE_LR * 8:.2e} --warmup-steps 200",
    "1024, lr x sqrt(32), warm-up 100": f"--batch-size 1024 --lr {BASE_LR * math.sqrt(32):.2e} --warmup-steps 100",
}


def _runs(quick: bool) -> dict[str, str]:
    given = os.environ.get("CAPTIONER_TTQ_RUNS")
    if not given:
        return dict(list(RUNS.items())[:2]) if quick else RUNS  # quick: checks that it runs
    return dict(part.split("=", 1) for part in given.split(";") if part.strip())


def _records(metrics: Path) -> list[dict]:
    """The epochs in metrics.jsonl so far (a line being written is not one yet)."""
    records = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _race(
    ctx: Context, store: Path, images: int, label: str, options: str, epochs: int, budget: float,
    target: float | None = None,
) -> dict:  # fmt: skip
    """Run `cli.py fit` and note when each epoch's line reaches metrics.jsonl (polled every 50 ms). With a
    `target`, stop it at the first epoch whose val loss reaches it, as MLPerf's runs end at their target."""
    out = ctx.workdir / f"ttq-{abs(hash(label))}"
    cmd = [sys.executable, "cli.py", "fit", "--store", str(store), "--out", str(out), "--epochs", str(epochs),
           "--device", ctx.device.type, *shlex.split(options), *ctx.pick(["--decoder", "tiny"], [])]  # fmt: skip
    ctx.log(" ".join(cmd[1:]))
    log = (ctx.workdir / "ttq.log").open("a+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    seen: list[float] = []
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and time.perf_counter() - t0 < budget:
        time.sleep(0.05)
        records = _records(metrics)
        if len(records) > len(seen):
            seen += [time.perf_counter() - t0] * (len(records) - len(seen))
            if target is not None and records[-1]["val_loss"] <= target:
                break
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=60)
    records = _records(metrics)
    seen += [time.perf_counter() - t0] * (len(records) - len(seen))
    if not records:
        log.seek(0)
        raise RuntimeError(f"fit wrote no epoch ({label}): {log.read()[-2000:]}")
    batch = int(shlex.split(options)[shlex.split(options).index("--batch-size") + 1])
    steps = math.ceil(sum(1 for s in flickr().splits[:images] if s == "train") / batch)
    best = min(r["val_loss"] for r in records)
    ctx.log(f"{label}: {len(records)} epochs in {seen[len(records) - 1]:.0f} s, best val loss {best:.4f}")
    return {"label": label, "options": options, "records": records, "at_s": seen[: len(records)], "steps": steps}


def run(ctx: Context) -> list[Table]:
    captions, splits = flickr().captions, flickr().splits
    n = ctx.pick(300, min(int(os.environ.get("CAPTIONER_TTQ_IMAGES") or len(captions)), len(captions)))
    epochs = int(os.environ.get("CAPTIONER_TTQ_EPOCHS") or ctx.pick(1, 8))
    budget = float(os.environ.get("CAPTIONER_TTQ_BUDGET") or ctx.pick(300, 240))  # seconds per run
    store = ctx.workdir / "ttq-layer4.h5"
    ctx.log(f"writing a layer4 store of {n} images (random features, real captions and splits)")
    make_store(store, captions[:n], splits=splits[:n], repeat_block=True)
    (base_label, base_options), *others = _runs(ctx.quick).items()
    races = [_race(ctx, store, n, base_label, base_options, epochs, budget)]
    target = min(r["val_loss"] for r in races[0]["records"])
    # The others run until they reach the target or their budget: a larger batch takes fewer steps an epoch and
    # may need more epochs (capped at `max_epochs`) in less time.
    max_epochs = int(os.environ.get("CAPTIONER_TTQ_MAX_EPOCHS") or 4 * epochs)
    race_budget = float(os.environ.get("CAPTIONER_TTQ_RACE_BUDGET") or budget)
    races += [_race(ctx, store, n, label, options, max_epochs, race_budget, target) for label, options in others]
    rows = []
    for race in races:
        records, at = race["records"], race["at_s"]
        hit = next((i for i, r in enumerate(records) if r["val_loss"] <= target), None)
        train = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]  # epoch 1 pays the warm-up
        rows.append(
            {
                "label": race["label"],
                "options": race["options"],
                "step_ms": 1000 * (sum(train) / len(train)) / race["steps"],
                "epochs": len(records),
                "to_target_s": at[hit] if hit is not None else float("nan"),
                "epochs_to_target": hit + 1 if hit is not None else float("nan"),
                "best_val_loss": min(r["val_loss"] for r in records),
                "final_val_loss": records[-1]["val_loss"],
            }
        )
    return [
        Table(
            f"ttq: time to the batch-32 run's best validation loss ({target:.3f}), {ctx.device.type}",
            [
                ("label", "run", ""),
                ("options", "fit options", ""),
                ("step_ms", "step ms", ".1f"),
                ("epochs", "epochs run", "d"),
                ("epochs_to_target", "epochs to target", ".0f"),
                ("to_target_s", "time to target (whole command)", "dur"),
                ("best_val_loss", "best val loss", ".3f"),
                ("final_val_loss", "final val loss", ".3f"),
            ],
            rows,
            [
                f"target: the first run's best val loss over its {epochs} epochs (at most {budget:.0f} s); each other "
                f"run stops at the first epoch that reaches it, or after {max_epochs} epochs or {race_budget:.0f} s.",
                "time to target: from the command's start to the epoch's line in metrics.jsonl (start-up, store "
                "read, validation and checkpoints included).",
                f"store: the first {n:,} Flickr30k images of the Karpathy file in their splits, real captions, "
                "random float16 features.",
            ],
        )
    ]
