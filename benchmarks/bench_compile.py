"""Section `compile` (opt-in: `--only compile`, a minute or two on a CPU): `fit --compile` against eager fit,
through `pipeline.train.fit` itself. It replaces `benchmarks/compile_ab.py`.

640 Flickr30k train images (their captions, random float16 features; 576 train, 64 val), the report's
decoder, batch 32, 3 epochs each; each epoch's training seconds and train loss, from fit's metrics.jsonl. The
first compiled epoch includes the compilation. `--quick`: 64 images, one eager epoch; the compiled run is skipped
there (compiling takes tens of seconds on a CPU; tests/train/test_fit.py checks the compiled path).
"""

from __future__ import annotations

import json
import time

from benchmarks.common import Context, Table, flickr, make_store, quiet


def run(ctx: Context) -> list[Table]:
    from pipeline.train import TrainConfig, fit

    n, epochs = ctx.pick(64, 640), ctx.pick(1, 3)
    val = n // 10
    store = make_store(ctx.workdir / "compile.h5", flickr().train[:n], splits=["train"] * (n - val) + ["val"] * val)
    rows = []
    for compiled in (False,) if ctx.quick else (False, True):
        out = ctx.workdir / f"compile-{compiled}"
        ctx.log(f"fit{' --compile' if compiled else ''}: {n} images, {epochs} epochs")
        t0 = time.perf_counter()
        with quiet():
            fit(TrainConfig(store=str(store), out=str(out), epochs=epochs, batch_size=32, device=ctx.device.type,
                            val_decode_images=32, compile=compiled))  # fmt: skip
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        rows.append(
            {
                "fit": "--compile (the decoder's cell, dynamic batch)" if compiled else "eager",
                "first_epoch_s": records[0]["seconds"],
                "later_epochs_s": ", ".join(f"{r['seconds']:.1f}" for r in records[1:]) or "-",
                "last_train_loss": records[-1]["train_loss"],
                "wall_s": wall,
            }
        )
    notes = [
        f"{n} train+val images ({val} val), their captions and random float16 features; the report's decoder, "
        f"batch 32, {epochs} epoch(s), {ctx.device.type}; seconds are fit's training passes (metrics.jsonl).",
    ]
    if ctx.quick:
        notes.append("--quick: the compiled run is skipped (compiling alone takes tens of seconds on a CPU).")
    return [
        Table(
            "compile: fit --compile against eager fit",
            [
                ("fit", "fit", ""),
                ("first_epoch_s", "epoch 1 (s)", ".1f"),
                ("later_epochs_s", "later epochs (s)", ""),
                ("last_train_loss", "train loss, last epoch", ".4f"),
                ("wall_s", "wall time (s)", ".1f"),
            ],
            rows,
            notes,
        )
    ]
