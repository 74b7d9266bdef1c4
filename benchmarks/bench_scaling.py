"""Section `scaling`: our training step at batch 32, 128, 512 with features read from the memory map or
resident; and anonymous memory while one pass reads every row of a multi-GB store."""

from __future__ import annotations

import gc
import time

from benchmarks.common import (
    EPOCH_IMAGES,
    ROW_BYTES,
    Context,
    OurTraining,
    RssSampler,
    Table,
    evict,
    flickr,
    make_store,
    measure,
    vocabulary,
)

PREFETCH = 4  # Batches.iterate's default depth
MIB = 2**20


def _throughput(ctx: Context) -> Table:
    from pipeline.store import FeatureStore

    dev = ctx.device
    store = FeatureStore(ctx.flickr_store())
    vocab = vocabulary("ours")
    sizes = {"warmup": 1, "min_steps": ctx.pick(1, 2), "max_steps": ctx.pick(1, 30), "budget_s": ctx.pick(0, 10)}
    rows = []
    for source in ("mmap", "resident"):
        for batch in ctx.pick((32,), (32, 128, 512)):
            ctx.log(f"our step, batch {batch}, features {source}")
            training = OurTraining(store, vocab, batch, 1, dev, source=source)
            try:
                t = measure(training.step, dev, **sizes)
            finally:
                training.close()
            del training
            gc.collect()
            rows.append(
                {
                    "features": source,
                    "batch": batch,
                    "batches_timed": t.steps,
                    "samples_per_s": t.rate,
                    "epoch_s": EPOCH_IMAGES / t.rate,
                }
            )
    by_batch = {(r["features"], r["batch"]): r["samples_per_s"] for r in rows}
    for r in rows:
        r["vs_batch32"] = r["samples_per_s"] / by_batch[(r["features"], 32)]
    store.close()
    resident = "a numpy copy in RAM, wrapped like the store" if dev.type == "cpu" else "Batches.make_resident()"
    return Table(
        f"scaling: our training step on {dev.type}, vocabulary {len(vocab):,} (ours)",
        [
            ("features", "features", ""),
            ("batch", "batch", "d"),
            ("batches_timed", "batches timed", "d"),
            ("samples_per_s", "samples/s", ",.1f"),
            ("epoch_s", "epoch (29k images, projected)", "dur"),
            ("vs_batch32", "vs batch 32", ".2f"),
        ],
        rows,
        [
            f"mmap = Batches reading the store's memory map (prefetch thread); resident = {resident}.",
            "one caption per image; samples/s after one warm-up batch; epoch = 29,000 / samples/s (projected).",
            "the memory-mapped store here is small enough to sit in the page cache: mmap vs resident compares "
            "the read path, not the disk.",
        ],
    )


def _memory(ctx: Context) -> Table:
    from pipeline.data import Batches, CaptionIndex
    from pipeline.store import FeatureStore
    from pipeline.vocab import MAX_LEN

    dev = ctx.device
    n = ctx.pick(300, 17_500)  # ~0.06 GB / ~3.5 GB of float16 features
    batch = 32
    texts = [caps[0] for caps in flickr().train]
    path = ctx.workdir / "big.h5"
    ctx.log(f"writing a {n * ROW_BYTES / 1e9:.2f} GB store ({n} rows) for the memory pass")
    try:
        make_store(path, [[texts[i % len(texts)]] for i in range(n)], repeat_block=True)
        size = path.stat().st_size
        evicted = evict(path)
        store = FeatureStore(path)
        vocab = vocabulary("ours")
        captions = CaptionIndex.build(vocab, store.caption_text, store.caption_image, len(store), MAX_LEN)
        batches = Batches(store, captions, store.split_rows("train"), batch, 1, dev)
        gc.collect()
        ctx.log("one pass over every row")
        read = 0
        with RssSampler() as rss:
            t0 = time.perf_counter()
            for b in batches.iterate(1, 0):
                read += b.features.shape[0]
            seconds = time.perf_counter() - t0
        store.close()
        del batches, store
    finally:
        path.unlink(missing_ok=True)
    if read != n:
        raise RuntimeError(f"the pass read {read} of {n} rows")
    growth = rss.peak["RssAnon"] - rss.start["RssAnon"]
    bound = (PREFETCH + 2) * batch * ROW_BYTES
    row = {
        "store_gib": size / 2**30,
        "rows": n,
        "batch": batch,
        "seconds": seconds,
        "gb_per_s": n * ROW_BYTES / seconds / 1e9,
        "anon_start_mib": rss.start["RssAnon"] / MIB,
        "anon_peak_mib": rss.peak["RssAnon"] / MIB,
        "anon_end_mib": rss.end["RssAnon"] / MIB,
        "anon_growth_mib": growth / MIB,
        "file_start_mib": rss.start["RssFile"] / MIB,
        "file_peak_mib": rss.peak["RssFile"] / MIB,
        "bound_mib": bound / MIB,
        "flat": bool(growth < bound + 64 * MIB),
        "samples": rss.samples,
        "page_cache": "evicted before the pass" if evicted else "warm (just written)",
    }
    return Table(
        "scaling: anonymous memory during one pass over every row of a store (memory map)",
        [
            ("store_gib", "store GiB", ".2f"),
            ("rows", "rows", ","),
            ("batch", "batch", "d"),
            ("seconds", "pass s", ".1f"),
            ("gb_per_s", "GB/s", ".2f"),
            ("anon_start_mib", "RssAnon start MiB", ",.0f"),
            ("anon_peak_mib", "RssAnon peak MiB", ",.0f"),
            ("anon_end_mib", "RssAnon end MiB", ",.0f"),
            ("anon_growth_mib", "peak - start MiB", ",.0f"),
            ("file_start_mib", "RssFile start MiB", ",.0f"),
            ("file_peak_mib", "RssFile peak MiB", ",.0f"),
            ("flat", "flat", ""),
        ],
        [row],
        [
            f"RssAnon sampled every 5 ms in a thread ({rss.samples} samples); flat = peak - start below the "
            f"batches in flight, ({PREFETCH} prefetched + 2) x {batch} rows = {bound / MIB:.0f} MiB, plus 64 MiB.",
            "the mapped pages show up in RssFile (page cache, reclaimable), not in RssAnon.",
            f"page cache: {row['page_cache']} (posix_fadvise DONTNEED; a VM host may still cache the file). "
            "The store was deleted afterwards.",
            f"rows are read in Batches' shuffled epoch order (epoch 1, seed 0), {batch} per batch, "
            "sorted within each batch.",
        ],
    )


def run(ctx: Context) -> list[Table]:
    return [_throughput(ctx), _memory(ctx)]
