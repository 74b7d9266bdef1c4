"""Section `finetune`: `fit --finetune layer4` from a layer3 store against the report's frozen loop and a
"fine-tune layer4 from pixels" loop, at batch 32 and equal vocabulary; captions/s and FLOPs per caption.

The loops, timed step by step in turn (interleaved: the machine's drift hits each alike), medians reported:
- the report's loop (benchmarks/reference.py): JPEG decode + transform, the frozen ResNet50, the report's decoder;
- ours, fine-tuned: fit's own pieces (Batches over a layer3 store, CaptionModel with the seeded layer4 trained at
  1e-4 and the decoder at 1e-3, make_optimizer, train_step), at 1 and 5 captions per image;
- from pixels: the same model, optimizer and train_step, but each step decodes the JPEGs (the report's
  transform) and runs ResNet50 from the stem to layer3 under no_grad, as toolkits that fine-tune do;
- ours, frozen from a layer4 store (today's `fit`), for scale.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import Context, OurTraining, Table, flickr, make_store, median, sync, vocabulary, write_jpegs
from benchmarks.reference import ReferenceLoop, report_encoder, report_transform

BATCH = 32  # the report's (--quick: 4, a smoke run)


class PixelsFinetune:
    """Fine-tuning layer4 from pixels: each step loads the batch's JPEGs, runs stem..layer3 under no_grad, then
    trains layer4 and the decoder with our train_step. Captions and batches come from an `OurTraining` (its
    stored rows are not used)."""

    def __init__(self, ours: OurTraining, images: list, trunk: torch.nn.Module, device: torch.device) -> None:
        self.ours, self.images, self.device = ours, images, device
        self.trunk = trunk.to(device, memory_format=torch.channels_last)
        self.transform = report_transform()

    def _pixels(self, rows: np.ndarray) -> torch.Tensor:
        from PIL import Image

        out = []
        for r in rows:
            with Image.open(self.images[int(r) % len(self.images)]) as img:
                out.append(self.transform(img.convert("RGB")))
        return torch.stack(out)  # (B, 3, 224, 224)

    def step(self) -> int:
        from pipeline.data import Batch
        from pipeline.train import train_step

        batch = next(self.ours._batches)
        x = self._pixels(batch.rows).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            layer3 = self.trunk(x).permute(0, 2, 3, 1)  # (B, 14, 14, 1024), as a layer3 store row
        batch = Batch(layer3, batch.tokens, batch.rows)
        self.ours.loss_sum += train_step(self.ours.module, self.ours.optimizer, batch, self.ours.cfg)
        return batch.tokens.shape[0] * batch.tokens.shape[1]

    def close(self) -> None:
        self.ours.close()


def flops_per_caption(step) -> float:
    """FLOPs of one training step (forward, backward, as torch.utils.flop_counter counts matmuls and
    convolutions) over the captions it trained on."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        captions = step()
    return counter.get_total_flops() / captions


def run(ctx: Context) -> list[Table]:
    from pipeline.encoder import build_resnet50, split_resnet50
    from pipeline.store import FeatureStore

    dev = ctx.device
    batch = ctx.pick(4, BATCH)
    n = ctx.pick(64, 640)
    captions = flickr().train[:n]
    ctx.log(f"writing layer3 and layer4 stores of {n} images (random features, real Flickr30k captions)")
    l3 = FeatureStore(make_store(ctx.workdir / "layer3.h5", captions, layer="layer3"))
    l4 = FeatureStore(make_store(ctx.workdir / "layer4.h5", captions))
    images = write_jpegs(ctx.workdir / "finetune-jpegs", 64, seed=2)
    vocab = vocabulary("report")
    resnet, _ = build_resnet50("none")
    trunk3, _ = split_resnet50(resnet)

    def head() -> torch.nn.Module:
        return split_resnet50(resnet)[1]  # a fresh copy of the seeded layer4 for each loop

    loops: dict[str, tuple[object, int]] = {}  # name -> (loop, captions per image)
    ctx.log("building the loops")
    loops["report's loop (frozen ResNet50 every step)"] = (
        ReferenceLoop(images, captions, vocab.stoi, len(vocab), dev, batch, encoder=report_encoder()),
        1,
    )
    for cpi in (1, 5):
        loops[f"ours, fine-tuned from a layer3 store, {cpi} cap/img"] = (
            OurTraining(l3, vocab, batch, cpi, dev, encoder=head()),
            cpi,
        )
        loops[f"from pixels, fine-tuned, {cpi} cap/img"] = (
            PixelsFinetune(OurTraining(l3, vocab, batch, cpi, dev, encoder=head()), images, trunk3, dev),
            cpi,
        )
    loops["ours, frozen, from a layer4 store (today's fit)"] = (OurTraining(l4, vocab, batch, 1, dev), 1)

    rounds = ctx.pick(1, 5)
    times: dict[str, list[float]] = {name: [] for name in loops}
    captions_per_step: dict[str, int] = {}
    try:
        ctx.log("warm-up step of each loop")
        for name, (loop, _) in loops.items():
            captions_per_step[name] = loop.step()
        for r in range(rounds):
            ctx.log(f"round {r + 1}/{rounds}: one step of each loop, in turn")
            for name, (loop, _) in loops.items():
                sync(dev)
                t0 = time.perf_counter()
                captions_per_step[name] = loop.step()
                sync(dev)
                times[name].append(time.perf_counter() - t0)
        ctx.log("counting FLOPs (one more step of each)")
        flops = {name: flops_per_caption(loop.step) for name, (loop, _) in loops.items()}
    finally:
        for loop, _ in loops.values():
            if hasattr(loop, "close"):
                loop.close()
        l3.close()
        l4.close()

    ref_name = next(iter(loops))
    toolkit = "from pixels, fine-tuned, 1 cap/img"  # how toolkits fine-tune: one encoder pass per caption
    rows = []
    rate = {name: captions_per_step[name] / median(times[name]) for name in loops}
    for name, (loop, cpi) in loops.items():
        model = getattr(loop, "ours", loop)
        trained = getattr(model, "model", None)
        if trained is None:
            trained = model.decoder
        pixels = f"from pixels, fine-tuned, {cpi} cap/img"
        ours = name.startswith("ours, fine-tuned")
        rows.append(
            {
                "loop": name,
                "captions_per_image": cpi,
                "steps_timed": len(times[name]),
                "seconds_per_step": median(times[name]),
                "captions_per_s": rate[name],
                "vs_report": rate[name] / rate[ref_name],
                "vs_toolkit": rate[name] / rate[toolkit] if ours else None,
                "vs_pixels": rate[name] / rate[pixels] if ours else None,
                "gflop_per_caption": flops[name] / 1e9,
                "trained_params_m": sum(p.numel() for p in trained.parameters() if p.requires_grad) / 1e6,
            }
        )
    table = Table(
        f"finetune: fit --finetune layer4 from a layer3 store vs the report's loop and the pixels loop "
        f"(batch {batch}, V = {len(vocab):,}, {dev.type})",
        [
            ("loop", "loop", ""),
            ("captions_per_image", "cap/img", "d"),
            ("steps_timed", "steps", "d"),
            ("seconds_per_step", "s/step (median)", ".2f"),
            ("captions_per_s", "captions/s", ",.1f"),
            ("vs_report", "vs report's loop", ".2f"),
            ("vs_toolkit", "vs pixels loop, 1 cap/img", ".2f"),
            ("vs_pixels", "vs pixels loop, same cap/img", ".2f"),
            ("gflop_per_caption", "GFLOP/caption", ".2f"),
            ("trained_params_m", "trained params (M)", ".1f"),
        ],
        rows,
        [
            f"each round runs one step of every loop in turn (interleaved), {rounds} rounds after a warm-up step; "
            "captions/s = captions per step / median step time.",
            "GFLOP/caption: torch.utils.flop_counter.FlopCounterMode over one step (forward and backward matmuls "
            "and convolutions; Adam's elementwise work is not counted), divided by the step's captions.",
            f"features: random float16 rows in real stores of {n} Flickr30k train images with their real captions; "
            f"JPEGs: {len(images)} synthetic 500x375 reused; ResNet50: seeded random (`--weights none`).",
            "the report's loop and the pixels loop decode the JPEGs in the training process (the report's "
            "transform), as the report did; the fine-tuned loops train layer4's convolutions (frozen BatchNorm).",
            "vocabulary: every word of all Flickr30k captions (the report's rule).",
            "pixels loop, 1 cap/img: how fine-tuning toolkits train (a sample is a caption: each caption pays its "
            "own encoder pass); at 5 cap/img the pixels loop shares one encoder pass among an image's captions "
            "too, which those toolkits do not.",
        ],
    )
    return [table]
