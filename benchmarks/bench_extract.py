"""Section `extract`: images/s end to end through pipeline.extract.extract, against the ceiling (the bare
ResNet50 trunk on a batch already in memory) and the JPEG decode alone."""

from __future__ import annotations

import time

import torch

from benchmarks.common import Context, Table, Timing, flickr, measure, quiet, write_jpegs, write_karpathy

BATCH = 64


def _ceiling(ctx: Context) -> tuple[Timing, float]:
    """The trunk alone on a batch in memory, as extract runs it (channels_last, autocast on CUDA); and the
    seconds build_encoder took."""
    from pipeline.encoder import build_encoder, encode
    from pipeline.runtime import autocast

    dev = ctx.device
    t0 = time.perf_counter()
    trunk, _ = build_encoder("none")
    build_s = time.perf_counter() - t0
    trunk = trunk.to(dev, memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)

    def forward() -> int:
        with torch.inference_mode(), autocast(dev, dtype=torch.float16):
            encode(trunk, x)
        return BATCH

    budget = {"min_steps": ctx.pick(1, 2), "max_steps": ctx.pick(1, 4), "budget_s": ctx.pick(0, 20)}
    return measure(forward, dev, warmup=1, **budget), build_s


def run(ctx: Context) -> list[Table]:
    from pipeline.extract import ExtractConfig, extract
    from pipeline.runtime import default_workers
    from pipeline.transform import load_uint8

    dev = ctx.device
    n = ctx.pick(64, 128) if dev.type == "cpu" else ctx.pick(256, 2048)  # a GPU needs more to be timed
    folder = ctx.workdir / "extract-images"
    ctx.log(f"writing {n} synthetic 500x375 JPEGs")
    paths = write_jpegs(folder, n, seed=2)
    mean_kb = sum(p.stat().st_size for p in paths) / n / 1024
    captions = write_karpathy(
        folder / "dataset_flickr30k.json", [p.name for p in paths], flickr().train[:n], ["train"] * n
    )
    rows = []

    # JPEG decode + resize alone, one process (what one DataLoader worker does per image)
    for p in paths[:4]:
        load_uint8(p)
    t0 = time.perf_counter()
    for p in paths:
        load_uint8(p)
    decode_s = time.perf_counter() - t0
    rows.append({"path": "JPEG decode + resize only (1 process)", "images": n, "seconds": decode_s})

    ctx.log("ResNet50 trunk on an in-memory batch (the ceiling)")
    t, build_s = _ceiling(ctx)
    ceiling = t.rate
    rows.append({"path": "ceiling: trunk forward, batch in memory", "images": t.samples, "seconds": t.seconds})

    default = default_workers()
    choices = [0, 1, 2] if dev.type == "cpu" else sorted({0, 4, default})
    for workers in choices:
        ctx.log(f"extract, {n} images, workers={workers}")
        store = ctx.workdir / f"extract-w{workers}.h5"
        cfg = ExtractConfig(
            images=folder,
            captions=captions,
            store=store,
            weights="none",
            batch_size=BATCH,
            workers=workers,
            device=dev.type,
            overwrite=True,
        )
        t0 = time.perf_counter()
        with quiet():
            summary = extract(cfg)
        seconds = time.perf_counter() - t0
        if summary.get("images_written") != n:
            raise RuntimeError(f"extract wrote {summary.get('images_written')} of {n} images")
        label = f"extract end to end, workers={workers}" + (" (default)" if workers == default else "")
        rows.append({"path": label, "workers": workers, "images": n, "seconds": seconds})
        store.unlink()

    for r in rows:
        r["images_per_s"] = r["images"] / r["seconds"]
        r["vs_ceiling"] = r["images_per_s"] / ceiling
    table = Table(
        f"extract: images/s on {dev.type} (batch {BATCH})",
        [
            ("path", "path", ""),
            ("images", "images", "d"),
            ("seconds", "seconds", ".2f"),
            ("images_per_s", "images/s", ",.1f"),
            ("vs_ceiling", "of ceiling", ".0%"),
        ],
        rows,
        [
            f"{n} synthetic 500x375 JPEGs (mean {mean_kb:.0f} KB; real Flickr30k photos average ~130 KB) with a "
            "Karpathy captions file; --weights none; the page cache holds the JPEGs (written just before).",
            "end to end = the whole extract() call: reading captions, building the ResNet50 "
            f"({build_s:.1f} s here), creating the store, worker start-up, decode, forward, writes. These fixed "
            f"costs weigh more on {n} images than on a 31k-image run.",
            "ceiling = the trunk alone on a random (B, 3, 224, 224) channels_last batch, after one warm-up batch.",
            f"decode + resize: {1000 * decode_s / n:.1f} ms per image in one process; its 'of ceiling' says how "
            "many times over one process could feed the trunk.",
        ],
    )
    return [table]
