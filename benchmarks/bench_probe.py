"""The linear-probe ceiling of a store: what a linear classifier reads from its features, per attribute.

    uv run python -m benchmarks.bench_probe --store cache/demo/features.h5 --labels cache/demo/demo_captions.json
    uv run python -m benchmarks.bench_probe --quick      # a 60-picture demo set made and extracted here (~1 min)

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


def _quick_store(folder: Path) -> tuple[Path, Path]:
    from pipeline.demo import make_dataset
    from pipeline.extract import ExtractConfig, extract

    captions = make_dataset(folder, 60, size=96)
    store = folder / "features.h5"
    extract(ExtractConfig(images=folder, captions=captions, store=store, weights="none", device="cpu"))
    return store, captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--quick", action="store_true", help="probe a tiny demo store made here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.store, args.labels = _quick_store(Path(tmp))
        if args.store is None or args.labels is None:
            parser.error("give --store and --labels, or --quick")
        rows = probe_store(args.store, read_labels(args.labels))
    print(f"| attribute | pool | test accuracy | val accuracy | chance | penalty |  ({args.store})")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['attribute']} | {r['pool']} | {r['accuracy']:.1%} | {r['val_accuracy']:.1%} | {r['chance']:.1%} "
            f"| {r['penalty']:g} |"
        )


if __name__ == "__main__":
    main()
