"""Section `step`: fit's training step alone, in samples/s, for comparing two checkouts on the same machine
(before and after a change). It replaces `benchmarks/ab_step.py`.

    uv run python -m benchmarks.run --only step        # in each checkout; alternate them over several rounds

`OurTraining` (fit's own Batches, make_optimizer and train_step) at fit's default vocabulary (min count 5 on
Flickr30k's train split), batch 32, one caption per image, over the run's store of Flickr30k train images
(random float16 features, seed 0: the same store in every checkout). Two warm-up batches, then a fixed number
of timed batches. On a shared machine the speed drifts from minute to minute: alternate the checkouts, and their
order, over several rounds, and compare medians.
"""

from __future__ import annotations

from benchmarks.common import Context, OurTraining, Table, measure, vocabulary

BATCH = 32


def run(ctx: Context) -> list[Table]:
    from pipeline.store import FeatureStore

    dev = ctx.device
    steps = ctx.pick(1, 10)
    vocab = vocabulary("ours")
    with FeatureStore(ctx.flickr_store()) as store:
        training = OurTraining(store, vocab, BATCH, 1, dev)
        try:
            t = measure(training.step, dev, warmup=ctx.pick(1, 2), min_steps=steps, max_steps=steps, budget_s=0)
        finally:
            training.close()
        images = len(store)
    row = {"vocab_size": len(vocab), "batch": BATCH, "steps": t.steps, "seconds": t.seconds, "samples_per_s": t.rate}
    return [
        Table(
            f"step: fit's training step alone ({dev.type}), report decoder, batch {BATCH}",
            [
                ("vocab_size", "V", ","),
                ("batch", "batch", "d"),
                ("steps", "batches timed", "d"),
                ("samples_per_s", "samples/s", ",.2f"),
            ],
            [row],
            [
                f"OurTraining (fit's Batches, make_optimizer, train_step) over a store of {images} images (random "
                "float16 features, seed 0); one caption per image; warm-up batches first.",
                "for an A/B of two checkouts: run this in each, alternating them and their order over several rounds.",
            ],
        )
    ]
