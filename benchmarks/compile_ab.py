"""`fit --compile` against eager fit, on real captions: `uv run python -m benchmarks.compile_ab`.

640 Flickr30k train images (real captions, random float16 features; 576 train, 64 val), the report's decoder,
batch 32, 3 epochs each; prints each epoch's training seconds and train loss (BENCHMARKS.md, `fit --compile`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import flickr, make_store
from pipeline.train import TrainConfig, fit


def main() -> None:
    work = Path(tempfile.mkdtemp())
    store = make_store(work / "s.h5", flickr().train[:640], splits=["train"] * 576 + ["val"] * 64)
    for compiled in (False, True):
        out = work / f"compile-{compiled}"
        t0 = time.perf_counter()
        fit(TrainConfig(store=str(store), out=str(out), epochs=3, batch_size=32, device="cpu", val_decode_images=32,
                        compile=compiled))  # fmt: skip
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(
            f"compile {compiled}: wall {wall:.1f} s, epochs {[round(r['seconds'], 1) for r in records]} s, "
            f"train loss {[round(r['train_loss'], 4) for r in records]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
