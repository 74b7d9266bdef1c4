"""Section `scst` (opt-in): SCST's cost (`fit --scst-after`), a self-critical epoch against a cross-entropy epoch
on the same store, CPU.

    uv run python -m benchmarks.run --only scst            # 512 images: a few minutes on 2 busy cores
    uv run python -m benchmarks.run --only scst --quick    # 32 images (1 step an epoch), the tiny decoder

(Its figures in BENCHMARKS.md were measured with the earlier `--quick`: 64 images, the report's decoder.)

The store holds the first N Flickr30k train images' real captions (the vocabulary, the references and the
document frequencies are real) and random features (benchmarks.common.make_store). Each epoch is one pass of
fit's own pieces: `train.train_epoch` over `loss.CaptionTraining` (1 caption per image), and
`scst.scst_epoch` over `scst.SelfCriticalTraining` (5 samples per image, mean and greedy baselines), batch 32.
The decoder starts untrained, so every sample runs the full 19 steps: the most an SCST step costs. The scorer's
share is the time spent in `scst.Rewards` (CIDEr-D on the CPU from token ids) over the epoch's time.
Load from other processes changes every number: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BenchmarkError, Context, Skipped, Table, flickr, make_store


def epochs(images: int, decoder: str, workdir: Path) -> list[dict]:
    """One cross-entropy and two SCST epochs (mean, greedy baselines) from the same start; then the setting."""
    from pipeline.data import Batches
    from pipeline.loss import CaptionTraining
    from pipeline.model import CaptionModel
    from pipeline.scst import Rewards, SelfCriticalTraining, scst_epoch
    from pipeline.train import TrainConfig, build_model, make_optimizer, prepare, train_epoch, train_step

    class TimedRewards(Rewards):
        """Rewards that add up the seconds they take."""

        seconds = 0.0

        def __call__(self, rows, tokens):
            t0 = time.perf_counter()
            try:
                return super().__call__(rows, tokens)
            finally:
                self.seconds += time.perf_counter() - t0

    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "features.h5"
    make_store(store, flickr().train[:images])
    cfg = TrainConfig(store=str(store), epochs=1, batch_size=32, device="cpu", decoder=decoder, feature_norm="none")
    data = prepare(cfg)
    batches = Batches(data.store, data.captions, data.train_rows, cfg.batch_size, 1, torch.device("cpu"))
    warm = CaptionModel(build_model(cfg, len(data.vocab)))  # first calls load code (fused Adam...): not timed
    train_step(CaptionTraining(warm), make_optimizer(warm, cfg.lr), next(iter(batches.iterate(0, 0))), cfg)
    rows = []
    for phase in ("xe", "scst mean", "scst greedy"):
        torch.manual_seed(0)
        model = CaptionModel(build_model(cfg, len(data.vocab)))
        optimizer = make_optimizer(model, cfg.lr)
        if phase == "xe":
            record, scorer = train_epoch(CaptionTraining(model), optimizer, batches, 1, cfg), 0.0
        else:
            rewards = TimedRewards(data.vocab, data.captions, data.train_rows)
            module = SelfCriticalTraining(model, rewards, phase.split()[1], max_steps=cfg.max_len - 1)
            record, scorer = scst_epoch(module, optimizer, batches, 1, cfg), rewards.seconds
        seconds = record["seconds"]  # the training pass alone
        rows.append({"phase": phase, "epoch_s": seconds, "scorer_share": scorer / seconds, "record": record})
    data.store.close()
    rows.append({"vocabulary": len(data.vocab), "images": len(data.train_rows), "decoder": decoder})
    return rows


def run(ctx: Context) -> list[Table]:
    if ctx.device.type != "cpu":
        raise Skipped("measured on the CPU only (the scorer runs there); run it without --device cuda")
    images, decoder = (32, "tiny") if ctx.quick else (512, "report")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        *rows, meta = epochs(images, decoder, ctx.workdir / "scst")
    finally:
        torch.set_num_threads(threads)
    xe = rows[0]["epoch_s"]
    table = [
        {
            "phase": r["phase"],
            "epoch_s": r["epoch_s"],
            "vs_xe": r["epoch_s"] / xe,
            "scorer_share": r["scorer_share"],
            "reward": r["record"].get("reward"),
            "baseline": r["record"].get("baseline"),
        }
        for r in rows
    ]
    load = os.getloadavg()
    return [
        Table(
            f"scst: an SCST epoch against a cross-entropy epoch, {meta['images']} train images, CPU",
            [
                ("phase", "epoch", ""),
                ("epoch_s", "seconds", ".2f"),
                ("vs_xe", "x cross-entropy", ".1f"),
                ("scorer_share", "scorer share", ".1%"),
                ("reward", "reward", ".3f"),
                ("baseline", "baseline", ".3f"),
            ],
            table,
            [
                f"vocabulary {meta['vocabulary']}, decoder {meta['decoder']}, batch 32, at most 2 torch threads; "
                f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
                "an untrained decoder: every sample runs the full 19 steps, the most an SCST step costs; the scorer "
                "share is the time in scst.Rewards (CIDEr-D from token ids) over the epoch's.",
            ],
        )
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.bench_scst [--quick]`: the same as `benchmarks.run --only scst`, printed only."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scst", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images, the tiny decoder: checks that it runs")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scst-") as tmp:
            tables = run(Context(torch.device("cpu"), args.quick, Path(tmp)))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t in tables:
        print(t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
