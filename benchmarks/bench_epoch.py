"""Section `epoch` (opt-in, for a GPU: `--only epoch --device cuda`): the wall time of whole training epochs at
Flickr30k scale, fit --finetune layer4 from a layer3 store against today's fit from a layer4 store.

29,000 images (the Karpathy train split, their real captions), random float16 features: an 11.6 GB layer3 store
and a 5.8 GB layer4 one, written to the scratch folder (set TMPDIR: they need 17.5 GB). Each is trained with
fit's own pieces (OurTraining: Batches, resident on the GPU when the features fit as fit decides, make_optimizer,
train_step with fit's autocast), batch 32, one full epoch timed after a few warm-up steps.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import EPOCH_IMAGES, Context, OurTraining, Skipped, Table, flickr, make_store, sync, vocabulary


def _epoch(ours: OurTraining, device: torch.device, warmup: int) -> tuple[float, int]:
    """Seconds and captions of one whole epoch (len(batches) steps), after `warmup` steps."""
    for _ in range(warmup):
        ours.step()
    sync(device)
    t0 = time.perf_counter()
    captions = sum(ours.step() for _ in range(len(ours.batches)))
    sync(device)
    return time.perf_counter() - t0, captions


def run(ctx: Context) -> list[Table]:
    from pipeline.encoder import build_layer4
    from pipeline.store import FeatureStore
    from pipeline.train import TrainConfig, fits_on_gpu

    dev = ctx.device
    if dev.type == "cpu" and not ctx.quick:
        raise Skipped("sized for a GPU (29,000-image epochs: hours on a CPU); --device cuda, or --quick to check it")
    n = ctx.pick(8, EPOCH_IMAGES)
    captions = flickr().train[:n]
    vocab = vocabulary("ours")
    rows = []
    for layer, finetune, cpi in (("layer4", False, 1), ("layer3", True, 1), ("layer3", True, 5)):
        path = ctx.workdir / f"{layer}.h5"
        if not path.exists():
            ctx.log(f"writing a {layer} store of {n} images (random features)")
            make_store(path, captions, layer=layer, repeat_block=True)
        store = FeatureStore(path)
        encoder = build_layer4("none")[0] if finetune else None
        ours = OurTraining(store, vocab, 32, cpi, dev, encoder=encoder)
        resident = dev.type == "cuda" and fits_on_gpu(TrainConfig(), ours.batches, dev)
        if resident:
            ours.batches.make_resident()
        ctx.log(f"{layer} store, finetune {finetune}, {cpi} captions per image: one epoch of {len(ours.batches)} steps")
        try:
            seconds, done = _epoch(ours, dev, warmup=ctx.pick(1, 20))
        finally:
            ours.close()
            store.close()
        rows.append(
            {
                "store": layer,
                "training": "fit --finetune layer4" if finetune else "fit (frozen features)",
                "captions_per_image": cpi,
                "images": n,
                "resident": resident,
                "epoch_s": seconds,
                "captions_per_s": done / seconds,
                "row_bytes": int(store.features[0].nbytes),
            }
        )
        del ours
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["epoch_s"]
    for r in rows:
        r["vs_layer4"] = r["epoch_s"] / base
    return [
        Table(
            f"epoch: fit --finetune layer4 (layer3 store) vs fit (layer4 store), {n:,} images, batch 32, {dev.type}",
            [
                ("store", "store", ""),
                ("training", "training", ""),
                ("captions_per_image", "cap/img", "d"),
                ("resident", "features resident on the GPU", ""),
                ("epoch_s", "epoch", "dur"),
                ("captions_per_s", "captions/s", ",.0f"),
                ("vs_layer4", "epoch time vs layer4 store", ".2f"),
            ],
            rows,
            [
                "one whole epoch timed (every training image once, with its captions), after warm-up steps; "
                "random float16 features, the real captions of the first images of the Karpathy train split.",
                "vocabulary: min count 5 on the train split (fit's default); autocast as fit (bf16 on CUDA).",
            ],
        )
    ]
