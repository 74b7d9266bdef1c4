"""Section `quality` (opt-in: `--only quality`, ~15-20 minutes on 2 CPU cores): what the captions name, against
what a linear probe reads from the same features (pipeline.probe), on three runs with the random ResNet50
(`--weights none`) and the demo's settings (DemoConfig's images, epochs and fit recipe, `demo.run.train_config`):

- the demo as `cli.py demo` runs it (a frozen layer4 store);
- the demo fine-tuning layer4 (a layer3 store, `demo --finetune`);
- the second picture set (benchmarks/hidden_set.py: other shapes, colours, places, backgrounds and templates),
  extracted, fitted and evaluated as the demo does: the recipe must not be tuned to the demo's generator.

For each: colour, shape and place accuracy of the test captions and of the probe, the attention mass on the
object while a caption names a colour or a shape against the object's share (the demo's pictures only: the
second set does not record where its object is), test CIDEr-D and the wall time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from benchmarks.common import Context, Table, quiet


def run(ctx: Context) -> list[Table]:
    from pipeline.config import DemoConfig

    full = DemoConfig()
    base = DemoConfig(
        images=ctx.pick(40, full.images), epochs=ctx.pick(1, full.epochs), size=ctx.pick(96, full.size), weights="none"
    )
    rows = []
    for name, finetune in (("demo (frozen layer4 store)", False), ("demo --finetune (layer3 store)", True)):
        cfg = dataclasses.replace(base, out=ctx.workdir / f"demo-{finetune}", finetune=finetune)
        ctx.log(f"{name}: {cfg.images} images, {cfg.epochs} epochs")
        rows.append({"run": name} | _demo_row(cfg))
    ctx.log(f"second picture set: {base.images} images, {base.epochs} epochs")
    rows.append({"run": "second set (hidden_set.py)"} | _hidden_row(base, ctx.workdir / "hidden"))
    columns = [("run", "run", "")]
    for attribute in ("colour", "shape", "place"):
        columns += [(f"{attribute}_acc", attribute, ".1%"), (f"{attribute}_probe", "probe", ".1%")]
    columns += [
        ("shape_glimpse", "shape, probe on one glimpse", ".1%"),
        ("colour_ratio", "attention on object / its share (colour words)", ".2f"),
        ("shape_ratio", "(shape words)", ".2f"),
        ("cider_d", "test CIDEr-D", ".3f"),
        ("seconds", "wall (s)", ".0f"),
    ]
    notes = [
        f"{base.images} pictures at {base.size} px (80/10/10), {base.epochs} epochs, {base.captions_per_image} "
        f"caption(s) per image per epoch, seed {base.seed}; test captions at beam 3 (as evaluate).",
        "probe: logistic regression on the whole standardised 7x7 grid, fitted on train, penalty chosen on val; "
        "one glimpse: the same on the object's cells averaged by their cover (what one attention step reads).",
        "attention ratio: the mean attention mass on the object's cells over the steps that emit a colour (or "
        "shape) word, over the object's mean share of the image; 1.0 is attention spread evenly.",
    ]
    return [Table("quality: what the captions name, against the linear probe (CPU)", columns, rows, notes)]


def _demo_row(cfg) -> dict:
    from pipeline.demo import attribute_accuracy, demo, object_attention
    from pipeline.demo.run import probe_accuracy

    t0 = time.perf_counter()
    with quiet():
        demo(cfg)
    seconds = time.perf_counter() - t0
    scores = json.loads((cfg.out / "scores.json").read_text(encoding="utf-8"))
    data = json.loads((cfg.out / "demo_captions.json").read_text(encoding="utf-8"))["images"]
    truth = {f"{e['filepath']}/{e['filename']}": e["attributes"] for e in data}
    store = cfg.out / "features.h5"
    found = {k: v[0] for k, v in attribute_accuracy(scores["captions"], truth).items()}
    glimpse = {"shape_glimpse": probe_accuracy(store, truth, "glimpse")["shape"]}
    return (
        _row(found, probe_accuracy(store, truth), scores, seconds)
        | glimpse
        | object_attention(cfg.out / "model.pt", store, truth)
    )


def _hidden_row(cfg, folder: Path) -> dict:
    from benchmarks.hidden_set import attribute_accuracy, make_hidden_set
    from pipeline.demo.run import probe_accuracy, train_config
    from pipeline.evaluate import EvaluateConfig, evaluate
    from pipeline.extract import ExtractConfig, extract
    from pipeline.train import fit

    t0 = time.perf_counter()
    captions, truth = make_hidden_set(folder, cfg.images, cfg.size)
    store = folder / "features.h5"
    with quiet():
        extract(ExtractConfig(images=folder, captions=captions, store=store, weights="none", device="cpu"))
        fit(train_config(cfg, store, folder))
        scores = evaluate(EvaluateConfig(model=folder / "model.pt", store=store, device="cpu"))
    seconds = time.perf_counter() - t0
    return _row(attribute_accuracy(scores["captions"], truth), probe_accuracy(store, truth), scores, seconds)


def _row(found: dict[str, float], probe: dict[str, float], scores: dict, seconds: float) -> dict:
    return (
        {f"{a}_acc": found[a] for a in found}
        | {f"{a}_probe": probe[a] for a in probe}
        | {"cider_d": scores["metrics"]["CIDEr-D"], "seconds": seconds}
        | {"test_images": len(scores["captions"]), "sample_captions": [c["caption"] for c in scores["captions"][:4]]}
    )
