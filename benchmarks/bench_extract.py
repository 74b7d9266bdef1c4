"""Section `extract`: images/s end to end through pipeline.extract.extract, against the ceiling (the bare
ResNet50 trunk on a batch already in memory) and the JPEG decode alone; JPEGs decoded by Pillow in the workers
(--decode cpu) and on the GPU (--decode gpu, on CUDA), and how far apart the two decoders' features are."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import Context, Table, Timing, flickr, measure, quiet, write_jpegs, write_karpathy

BATCH = 64
DECODERS = {"cpu": "Pillow in workers", "gpu": "nvjpeg on the GPU", "cpu-batched": "batched torchvision, CPU"}


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


def _extract(ctx: Context, folder: Path, captions: Path, workers: int, decode: str, store: Path) -> tuple[float, dict]:
    """One whole extract() call; its wall seconds and summary. decode: cpu | gpu, or "cpu-batched": the GPU path's
    code decoding on the CPU (torchvision's libjpeg-turbo in this process), what --quick measures on a CPU."""
    from pipeline.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        images=folder,
        captions=captions,
        store=store,
        weights="none",
        batch_size=BATCH,
        workers=workers,
        device=ctx.device.type,
        overwrite=True,
        decode="cpu" if decode == "cpu-batched" else decode,
    )
    t0 = time.perf_counter()
    with quiet():
        summary = extract(cfg, jpeg_device="cpu" if decode == "cpu-batched" else None)
    return time.perf_counter() - t0, summary


def _agreement(a: Path, b: Path) -> tuple[float, float, int]:
    """Median and largest relative (L2) difference between the features of the same images in two stores, and
    how many images were compared."""
    import numpy as np

    from pipeline.store import WRITTEN, FeatureStore

    with FeatureStore(a) as x, FeatureStore(b) as y:
        both = np.flatnonzero((x.status == WRITTEN) & (y.status == WRITTEN))
        fx = np.asarray(x.features, dtype=np.float32)[both].reshape(len(both), -1)
        fy = np.asarray(y.features, dtype=np.float32)[both].reshape(len(both), -1)
    rel = np.linalg.norm(fy - fx, axis=1) / np.linalg.norm(fx, axis=1)
    return float(np.median(rel)), float(rel.max()), len(both)


def _photos(ctx: Context) -> tuple[Path, Path] | None:
    """The real Flickr photos of the data folder (photos/*.jpg), with a captions file, or None."""
    from benchmarks.common import SHARED_DATA

    found = sorted((SHARED_DATA / "photos").glob("*.jpg"))
    if not found:
        return None
    folder = ctx.workdir / "extract-photos"
    folder.mkdir(exist_ok=True)
    for p in found:
        (folder / p.name).write_bytes(p.read_bytes())
    captions = folder / "captions.txt"
    captions.write_text("image,caption\n" + "".join(f"{p.name},a photo\n" for p in found), encoding="utf-8")
    return folder, captions


def run(ctx: Context) -> list[Table]:
    from pipeline.runtime import default_workers
    from pipeline.transform import load_uint8

    dev = ctx.device
    cuda = dev.type == "cuda"
    n = ctx.pick(64, 128) if not cuda else ctx.pick(256, 2048)  # a GPU needs more to be timed
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
    # (decode, workers): Pillow in the workers; then the GPU path: nvjpeg on CUDA, its code on the CPU otherwise
    batched = "gpu" if cuda else "cpu-batched"
    runs = [("cpu", w) for w in ([0, 1, 2] if not cuda else sorted({0, 4, default}))]
    runs += [(batched, w) for w in ([0] if not cuda else sorted({0, 4, default}))]
    kept = {}  # the stores to compare: Pillow's and the batched path's, at the default workers (CPU: 0)
    for decode, workers in runs:
        ctx.log(f"extract, {n} images, --decode {decode}, workers={workers}")
        store = ctx.workdir / f"extract-{decode}-w{workers}.h5"
        seconds, summary = _extract(ctx, folder, captions, workers, decode, store)
        if summary.get("images_written") != n:
            raise RuntimeError(f"extract wrote {summary.get('images_written')} of {n} images")
        on_device = summary.get("device_decoded_now", 0)
        if decode != "cpu" and on_device != n:
            raise RuntimeError(f"--decode {decode}: {on_device} of {n} JPEGs decoded on the device")
        label = f"extract end to end, {DECODERS[decode]}, workers={workers}"
        label += " (default)" if workers == default else ""
        rows.append({"path": label, "workers": workers, "images": n, "seconds": seconds, "decode": decode})
        if workers == (default if cuda else 0):
            kept[decode] = store
        else:
            store.unlink()

    notes = []
    if len(kept) == 2:  # the features of the two decoders, on the same JPEGs
        median, worst, count = _agreement(kept["cpu"], kept[batched])
        rows_agree = {"synthetic JPEGs": (median, worst, count)}
        photos = _photos(ctx)
        if photos is not None:
            stores = {}
            for decode in ("cpu", batched):
                stores[decode] = ctx.workdir / f"photos-{decode}.h5"
                _extract(ctx, photos[0], photos[1], 0, decode, stores[decode])
            rows_agree["real Flickr photos"] = _agreement(stores["cpu"], stores[batched])
        for what, (median, worst, count) in rows_agree.items():
            notes.append(
                f"features, {'nvjpeg' if cuda else 'batched torchvision (CPU)'} against Pillow, {count} {what} "
                f"(float16 stores, --weights none): relative L2 difference median {median:.1e}, "
                f"largest {worst:.1e} (the tests' tolerance: 1e-2)."
            )

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
            f"{n} synthetic 500x375 JPEGs (mean {mean_kb:.0f} KB, 4:2:0 chroma; real Flickr30k photos average "
            "~130 KB) with a Karpathy captions file; --weights none; the page cache holds the JPEGs (written "
            "just before).",
            "end to end = the whole extract() call: reading captions, building the ResNet50 "
            f"({build_s:.1f} s here), creating the store, worker start-up, decode, forward, writes. These fixed "
            f"costs weigh more on {n} images than on a 31k-image run.",
            "Pillow in workers = --decode cpu; nvjpeg on the GPU = --decode gpu (the workers read bytes, the GPU "
            "decodes and resizes); batched torchvision, CPU = the GPU path's code with torchvision's CPU decoder "
            "in the main process (a check of that code on a CPU machine, not a way to run).",
            "ceiling = the trunk alone on a random (B, 3, 224, 224) channels_last batch, after one warm-up batch.",
            f"decode + resize: {1000 * decode_s / n:.1f} ms per image in one process; its 'of ceiling' says how "
            "many times over one process could feed the trunk.",
            *notes,
        ],
    )
    return [table]
