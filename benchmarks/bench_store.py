"""Section `store`: bytes per image of a float16 store, and the time to read a random batch of 32 rows
from the memory map (FeatureStore.features) against h5py fancy indexing, with a cold and a warm page cache."""

from __future__ import annotations

import mmap
import time

import h5py
import numpy as np

from benchmarks.common import ROW_BYTES, Context, Table, evict, median, read_through, unmap

BATCH = 32
MB = 1e6


def willneed_then_map(features: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Not pipeline code, a candidate: madvise(MADV_WILLNEED) each row's byte range (the kernel reads
    exactly those pages, asynchronously), then the same fancy index of the memory map."""
    m = getattr(features, "_mmap", None)
    if m is not None and hasattr(m, "madvise"):
        base = features.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 starts inside the mapping
        for r in rows:
            start = base + int(r) * ROW_BYTES
            page = start - start % mmap.PAGESIZE
            m.madvise(mmap.MADV_WILLNEED, page, ROW_BYTES + start - page)
    return features[rows]


def run(ctx: Context) -> list[Table]:
    from pipeline.store import FeatureStore

    path = ctx.flickr_store()
    store = FeatureStore(path)
    n = len(store)
    size = path.stat().st_size
    per_image = size / n
    size_table = Table(
        "store: size (float16)",
        [
            ("images", "images", ","),
            ("file_mb", "file MB", ",.1f"),
            ("bytes_per_image", "bytes / image", ",.0f"),
            ("feature_bytes", "features / image", ",d"),
            ("overhead", "other / image", ",.0f"),
            ("flickr30k_gb", "31,014 images (GB)", ".2f"),
        ],
        [
            {
                "images": n,
                "file_mb": size / MB,
                "bytes_per_image": per_image,
                "feature_bytes": ROW_BYTES,
                "overhead": per_image - ROW_BYTES,
                "flickr30k_gb": 31_014 * per_image / 1e9,
            }
        ],
        [
            "file size / images; 'other' is the image names, 5 real captions per image, splits, status and "
            "HDF5 metadata. float32 doubles the features (401,408 bytes per image).",
        ],
    )

    batches, drop = ctx.pick(12, 55), 5
    rng = np.random.default_rng(0)
    picks = [np.sort(rng.choice(n, BATCH, replace=False)) for _ in range(batches)]
    rows = []
    with h5py.File(path, "r") as f:
        ds = f["features"]
        for state in ("cold", "warm"):
            ctx.log(f"random batches of {BATCH} rows, page cache {state}")
            if state == "warm":
                read_through(path)
            methods: dict[str, tuple] = {
                "memory map: FeatureStore.features[rows]": (lambda r: store.features[r], []),
                'h5py: f["features"][rows]': (lambda r: ds[r], []),
                "(candidate) madvise WILLNEED per row, then the memory map": (
                    lambda r: willneed_then_map(store.features, r),
                    [],
                ),
            }
            for rows_ in picks:
                first = None
                for read, times in methods.values():
                    if state == "cold":
                        unmap(store.features)
                        evict(path)
                    t0 = time.perf_counter()
                    got = read(rows_)
                    times.append(time.perf_counter() - t0)
                    if first is None:
                        first = got
                    elif not np.array_equal(first, got):
                        raise RuntimeError("the read methods disagree")
            for method, (_, times) in methods.items():
                kept = times[drop:]
                rows.append(
                    {
                        "page_cache": state,
                        "method": method,
                        "batches": len(kept),
                        "median_ms": 1000 * median(kept),
                        "p90_ms": 1000 * float(np.percentile(kept, 90)),
                        "mb_per_s": BATCH * ROW_BYTES / median(kept) / MB,
                    }
                )
    store.close()
    for r in rows:
        mm = next(x for x in rows if x["page_cache"] == r["page_cache"] and x["method"].startswith("memory"))
        r["vs_mmap"] = r["median_ms"] / mm["median_ms"]
    read_table = Table(
        f"store: reading a random batch of {BATCH} rows (sorted) from {n} images",
        [
            ("page_cache", "page cache", ""),
            ("method", "method", ""),
            ("batches", "batches", "d"),
            ("median_ms", "median ms", ".2f"),
            ("p90_ms", "p90 ms", ".2f"),
            ("mb_per_s", "MB/s", ",.0f"),
            ("vs_mmap", "time vs memory map", ".2f"),
        ],
        rows,
        [
            f"{batches} batches, the first {drop} dropped; the same rows for every method.",
            "cold: the file's pages unmapped and dropped from the page cache (posix_fadvise DONTNEED) before each "
            "read; on a VM the host may still cache the file, so 'cold' can be faster than a real disk.",
            "warm: the whole file read once before, so every page is in the page cache.",
            "the candidate row is not pipeline code: it shows what a madvise(WILLNEED) per row before the "
            "fancy index would give (on a cold cache, faults on a memory map read pages one read-around window at "
            "a time and synchronously).",
        ],
    )
    return [size_table, read_table]
