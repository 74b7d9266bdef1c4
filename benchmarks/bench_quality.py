"""Section `quality` (opt-in: `--only quality`, ~15-25 minutes on 2 CPU cores): the demo with a frozen encoder
(a layer4 store, the demo before issue 10) against the demo fine-tuning layer4 (a layer3 store,
`fit --finetune layer4`), the same data, seed and number of epochs, the random ResNet50 (`--weights none`).

For each: colour, shape and place accuracy of the test captions against chance, and the attention mass on the
object's cells while a caption names a colour or a shape, against the object's share of the image
(pipeline.demo.attention_on_object), plus the wall time of the whole demo and of fit's training passes.
"""

from __future__ import annotations

import json
import time

from benchmarks.common import Context, Table, quiet


def run(ctx: Context) -> list[Table]:
    from pipeline.config import DemoConfig
    from pipeline.demo import attribute_accuracy, demo, object_attention

    base = {"images": ctx.pick(40, 480), "epochs": ctx.pick(1, 12), "size": ctx.pick(96, 224), "weights": "none"}
    variants = {
        "frozen (layer4 store)": {"finetune": False},
        "fine-tuned layer4 (layer3 store, --finetune layer4)": {"finetune": True},
    }
    rows = []
    for name, kw in variants.items():
        cfg = DemoConfig(out=ctx.workdir / ("demo-ft" if kw["finetune"] else "demo-frozen"), **base, **kw)
        ctx.log(f"demo, {name}: {cfg.images} images, {cfg.epochs} epochs")
        t0 = time.perf_counter()
        with quiet():
            demo(cfg)
        seconds = time.perf_counter() - t0
        scores = json.loads((cfg.out / "scores.json").read_text(encoding="utf-8"))
        data = json.loads((cfg.out / "demo_captions.json").read_text(encoding="utf-8"))["images"]
        truth = {f"{e['filepath']}/{e['filename']}": e["attributes"] for e in data}
        acc = attribute_accuracy(scores["captions"], truth)
        att = object_attention(cfg.out / "model.pt", cfg.out / "features.h5", truth)
        metrics = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            {"variant": name, "epochs": cfg.epochs, "test_images": len(scores["captions"])}
            | {f"{k}_acc": v[0] for k, v in acc.items()}
            | {f"{k}_chance": v[1] for k, v in acc.items()}
            | att
            | {
                "cider_d": scores["metrics"]["CIDEr-D"],
                "fit_train_s": sum(m["seconds"] for m in metrics),
                "demo_s": seconds,
                "sample_captions": [c["caption"] for c in scores["captions"][:4]],
            }
        )
    table = Table(
        f"quality: the demo, frozen vs fine-tuned layer4, {base['epochs']} epochs, random ResNet50, CPU",
        [
            ("variant", "encoder", ""),
            ("colour_acc", "colour", ".1%"),
            ("shape_acc", "shape", ".1%"),
            ("place_acc", "place", ".1%"),
            ("colour_ratio", "attention on object / its share (colour words)", ".2f"),
            ("shape_ratio", "(shape words)", ".2f"),
            ("colour_share", "object share", ".1%"),
            ("cider_d", "test CIDEr-D", ".3f"),
            ("fit_train_s", "fit training passes (s)", ".0f"),
            ("demo_s", "whole demo (s)", ".0f"),
        ],
        rows,
        [
            f"chance: colour {rows[0]['colour_chance']:.0%}, shape {rows[0]['shape_chance']:.0%}, place "
            f"{rows[0]['place_chance']:.0%}; {rows[0]['test_images']} test images, beam 3 (as evaluate).",
            "attention ratio: mean attention mass on the object's cells (each cell weighted by the share the object "
            "covers, on the 7x7 grid) over the steps that emit a colour (or shape) word, divided by the object's "
            "mean share of the image at those steps; 1.0 is attention spread evenly.",
            f"both runs: {base['images']} generated images at {base['size']} px, 5 captions per image per epoch, "
            "seed 0, min word count 1, validation CIDEr-D on 100 images for model.pt, fine-tuning at "
            "--encoder-lr 1e-4 (the default), layer4's BatchNorm frozen.",
        ],
    )
    return [table]
