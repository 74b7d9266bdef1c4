"""Section `probe` (opt-in): the linear-probe ceiling of a store, what a linear classifier reads from its
features, per attribute.

    uv run python -m benchmarks.run --only probe         # the demo's data (480 pictures, 224 px), made here
    uv run python -m benchmarks.run --only probe --quick # 40 pictures at 96 px
    uv run python -m benchmarks.bench_probe --store cache/demo/features.h5 --labels cache/demo/demo_captions.json

The section draws the demo's data (`pipeline.demo.make_dataset`, seed 0), extracts a layer4 store with the
random ResNet50 (`--weights none`) and probes it; the script probes any store with labels.

`--labels`: a Karpathy-layout captions file whose images carry an `attributes` object (the demo's
`demo_captions.json` does), or a JSON object {image path as stored: {attribute: label}}. Attributes that are
not plain labels (the demo's `object` geometry, `size`) are left out. The classifier (pipeline/probe.py):
L2-penalised logistic regression on standardised features, the whole grid and its mean over the cells, fitted
on the train split, its penalty chosen on val, scored on test. Compare its figures with how often the captions
name the same attributes (the demo prints both).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import Context, Table, quiet
from pipeline.probe import linear_probe
from pipeline.store import FeatureStore


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        found = {}
        for e in data["images"]:
            name = f"{e['filepath']}/{e['filename']}" if e.get("filepath") else e["filename"]
            found[name] = {k: v for k, v in e.get("attributes", {}).items() if isinstance(v, str)}
        return found
    return {k: {a: v for a, v in attrs.items() if isinstance(v, str)} for k, attrs in data.items()}


def probe_store(store_path: Path, labels: dict[str, dict[str, str]]) -> list[dict]:
    with FeatureStore(store_path) as store:
        names = store.images
        attributes = sorted({a for attrs in labels.values() for a in attrs})
        per_row = {a: [labels.get(n, {}).get(a, "") for n in names] for a in attributes}
        splits = [store.split_rows(s) for s in ("train", "val", "test")]
        return [r.to_dict() for r in linear_probe(store.features, per_row, *splits)]


def demo_store(folder: Path, images: int, size: int, device: str = "cpu") -> tuple[Path, Path]:
    """The demo's data (seed 0) and its layer4 store, extracted with the random ResNet50: (store, captions)."""
    from pipeline.demo import make_dataset
    from pipeline.extract import ExtractConfig, extract

    captions = make_dataset(folder, images, size=size)
    store = folder / "features.h5"
    with quiet():
        extract(ExtractConfig(images=folder, captions=captions, store=store, weights="none", device=device))
    return store, captions


COLUMNS = [
    ("attribute", "attribute", ""),
    ("pool", "features", ""),
    ("accuracy", "test accuracy", ".1%"),
    ("val_accuracy", "val accuracy", ".1%"),
    ("chance", "chance", ".1%"),
    ("penalty", "penalty", "g"),
]


def run(ctx: Context) -> list[Table]:
    images, size = ctx.pick(40, 480), ctx.pick(96, 224)
    ctx.log(f"probe: the demo's data, {images} pictures at {size} px, extract --weights none")
    store, labels = demo_store(ctx.workdir / "probe", images, size, ctx.device.type)
    rows = probe_store(store, read_labels(labels))
    return [
        Table(
            f"probe: a linear classifier on the demo's layer4 store ({images} pictures, random ResNet50)",
            COLUMNS,
            rows,
            [
                "pipeline.probe.linear_probe: L2-penalised logistic regression on standardised features, fitted on "
                "the train split (80%), penalty chosen on val, scored on test (10% each).",
                "compare with how often the demo's captions name the same attributes (the quality section).",
            ],
        )
    ]


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.bench_probe --store S --labels L`: probe any store (`--quick`: a tiny demo store)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--quick", action="store_true", help="probe a tiny demo store made here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.store, args.labels = demo_store(Path(tmp), 40, 96)
        if args.store is None or args.labels is None:
            parser.error("give --store and --labels, or --quick")
        rows = probe_store(args.store, read_labels(args.labels))
    print(Table(f"probe: {args.store}", COLUMNS, rows).markdown())


if __name__ == "__main__":
    main()
