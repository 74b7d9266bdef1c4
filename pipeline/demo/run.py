"""`demo`: the whole pipeline on the generated pictures (pipeline/demo/shapes.py), in a folder it claims, and
its report: how often the test captions name each attribute, next to a linear probe's ceiling and chance, and
where the attention goes while they name one."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import DemoConfig, TrainConfig
from pipeline.console import caption_line, extract_line, print_scores
from pipeline.demo.shapes import COLOURS, PLACES, SHAPES, image_names, make_dataset, object_mask
from pipeline.encoder import NAMED_WEIGHTS, imagenet_weights_file
from pipeline.errors import UserError
from pipeline.files import check_writable_folder, exclusive, write_text_atomic

log = logging.getLogger(__name__)


def attention_on_object(captions: list[tuple[list[str], np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Where attention goes while a caption names a colour or a shape. `captions`: (words, attention (len(words),
    P), object mask (P,)) per image. Per word kind, the mean attention mass on the object (sum of attention x
    the share of each cell the object covers) over the steps that emit such a word, the object's mean share
    of the image at those steps, and their ratio (1: attention spread evenly; higher: on the object)."""
    out: dict[str, float] = {}
    for kind, words in (("colour", set(COLOURS)), ("shape", set(SHAPES))):
        mass, share = [], []
        for caption, alphas, mask in captions:
            for t, w in enumerate(caption):
                if w in words:
                    mass.append(float(alphas[t] @ mask))
                    share.append(float(mask.mean()))
        out[f"{kind}_steps"] = len(mass)
        out[f"{kind}_mass"] = float(np.mean(mass)) if mass else float("nan")
        out[f"{kind}_share"] = float(np.mean(share)) if share else float("nan")
        out[f"{kind}_ratio"] = out[f"{kind}_mass"] / out[f"{kind}_share"] if mass else float("nan")
    return out


def attribute_accuracy(captions: list[dict], truth: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Share of generated captions naming the right colour, shape and place, next to chance."""
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES), "place": list(PLACES)}
    out = {}
    for attr, words in vocab.items():
        hits = sum(truth[c["image"]][attr] in re.findall(r"[a-z]+", c["caption"]) for c in captions)
        out[attr] = (hits / max(len(captions), 1), 1 / len(words))
    return out


def object_attention(model: Path, store: Path, truth: dict[str, dict], beam_size: int = 3) -> dict[str, float]:
    """`attention_on_object` for the test images of a demo store, decoded as evaluate decodes them."""
    import torch

    from pipeline import checkpoint
    from pipeline.decode import decode_rows
    from pipeline.store import FeatureStore

    ckpt = checkpoint.load(model)
    features = FeatureStore(store)
    net, vocab = checkpoint.build_model(ckpt, model, features.layer)
    rows = features.split_rows("test")
    decoded = decode_rows(net, features.features, rows, torch.device("cpu"), beam_size, checkpoint.max_steps(ckpt))
    names = features.images
    items = []
    for row, d in zip(rows, decoded, strict=True):
        attrs = truth[names[row]]
        items.append(([vocab.itos[t] for t in d.tokens], d.attention, object_mask(attrs, attrs["size"])))
    return attention_on_object(items)


def probe_accuracy(store: Path, truth: dict[str, dict], pool: str = "grid") -> dict[str, float]:
    """What a linear classifier reads from the store's features (pipeline.probe): the test accuracy per
    attribute, the ceiling the captions are held to. pool "grid": the whole grid; "glimpse": one mean of the
    cells weighted by the share of each the object covers (`object_mask`; pictures that record their object),
    what one attention step on the object reads."""
    from pipeline.probe import linear_probe
    from pipeline.store import FeatureStore

    with FeatureStore(store) as features:
        names = features.images
        labels = {a: [truth[n][a] if n in truth else "" for n in names] for a in ("colour", "shape", "place")}
        train, val, test = (features.split_rows(s) for s in ("train", "val", "test"))
        weights = None
        if pool == "glimpse":
            grid = features.features.shape[1]
            cells = np.ones(grid * grid)  # a row without an object
            weights = np.stack([object_mask(truth[n], truth[n]["size"], grid) if n in truth else cells for n in names])
        found = linear_probe(features.features, labels, train, val, test, pools=(pool,), weights=weights)
    return {r.attribute: r.accuracy for r in found}


def pick_weights(requested: str | None) -> str:
    if requested is not None:
        return requested
    for name in NAMED_WEIGHTS[:1]:
        if imagenet_weights_file(name).is_file():
            log.info(f"demo: using cached ImageNet weights {name}")
            return name
    log.info("demo: ImageNet weights are not cached, so the encoder is a seeded random ResNet50 (--weights none)")
    return "none"


MARKER = ".captioner-demo"  # written in every folder the demo makes: the only folders it clears
# What a demo run writes in its folder, and so what a rerun deletes (nothing else, ever), with the images
# that the marker records.
OWN_FILES = (
    "demo_captions.json",
    "features.h5",
    "features.h5.partial",
    "model.pt",
    "last.pt",
    "metrics.jsonl",
    "curves.png",
    "scores.json",
    "attention.png",
)
RECORDED = re.compile(r"^images/[^/\\]+$")  # what a record may name: a file directly in images/ (no `..`)


def demo(cfg: DemoConfig) -> dict:
    """Generate the sample, then extract, fit, evaluate, generate, in `cfg.out` (see `claim_folder`).
    Returns the test metrics."""
    with claim_folder(cfg.out, image_names(cfg.images)):
        return _run(cfg)


@contextlib.contextmanager
def claim_folder(out: Path, images: Sequence[str] = ()) -> Iterator[Path]:
    """Make `out` the demo's folder for the block: a new or empty folder (marked as the demo's), or one an
    earlier demo made, from which the files a demo writes and the images the earlier demo recorded are
    deleted (nothing else). A file, or a folder holding anything without the mark, is refused; so is a file
    at one of `images` (the images this run will draw, recorded in the mark before any is drawn) that no
    demo recorded. The folder's lock is held throughout."""
    _refuse_foreign(out)
    check_writable_folder(out, "--out")
    with exclusive(out, f"--out {out}"):
        _refuse_foreign(out)  # again, now that no other demo can be making it
        _clear(out)
        for rel in images:
            if (out / rel).exists() or (out / rel).is_symlink():
                raise UserError(
                    f"--out {out}: {rel} is not a file a demo recorded drawing, and this demo would draw over it: "
                    "move it, or give another --out"
                )
        record = {"made_by": "cli.py demo, which may delete what it wrote here", "images": list(images)}
        write_text_atomic(out / MARKER, json.dumps(record, indent=1) + "\n")
        yield out


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not _made_by_demo(out) and any(p.name != ".lock" for p in out.iterdir()):
        raise UserError(
            f"--out {out} is not empty and was not made by the demo: nothing in it is touched; "
            "give a new or empty folder"
        )


def _made_by_demo(out: Path) -> bool:
    """The marker, or (a folder of a demo that predates the marker) the demo's own captions file."""
    if (out / MARKER).is_file():
        return True
    try:
        return json.loads((out / "demo_captions.json").read_text(encoding="utf-8")).get("dataset") == "demo"
    except (OSError, ValueError, AttributeError):
        return False


def _recorded(out: Path) -> list[str]:
    """The images an earlier demo recorded drawing in `out`: the mark's record, or (a demo older than the record)
    the images its captions file lists. Only names directly inside images/ are taken."""
    try:
        names = json.loads((out / MARKER).read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, TypeError, KeyError):
        try:
            entries = json.loads((out / "demo_captions.json").read_text(encoding="utf-8"))["images"]
            names = [f"{e['filepath']}/{e['filename']}" for e in entries]
        except (OSError, ValueError, TypeError, KeyError):
            names = []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and RECORDED.match(n) and n[len("images/") :] not in (".", "..")]


def _clear(out: Path) -> None:
    """Delete what an earlier demo wrote in `out`; any other file stays."""
    drawn = _recorded(out)
    for name in OWN_FILES:
        (out / name).unlink(missing_ok=True)
    for rel in drawn:
        path = out / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
    with contextlib.suppress(OSError):  # not empty: someone else's files are in it
        (out / "images").rmdir()


def _report_attributes(result: dict, model: Path, store: Path, truth: dict[str, dict]) -> None:
    """How often the test captions name each attribute, next to the linear probe's ceiling, and where the
    attention goes while they name a colour or a shape."""
    probe, glimpse = probe_accuracy(store, truth), probe_accuracy(store, truth, "glimpse")
    log.info(
        "\nhow often a test caption names the right attribute, next to the ceiling: what a linear classifier reads "
        "from the same features, from the whole grid and from one glimpse (the object's cells averaged, as one "
        "attention step reads them); chance = a random guess:"
    )
    for attr, (acc, chance) in attribute_accuracy(result["captions"], truth).items():
        log.info(
            f"  {attr:7s} captions {acc:6.1%}   linear probe {probe[attr]:6.1%}   one glimpse {glimpse[attr]:6.1%}   "
            f"chance {chance:6.1%}"
        )
    att = object_attention(model, store, truth)
    log.info("attention on the object while a test caption names a colour or a shape (1x = spread evenly):")
    for kind in ("colour", "shape"):
        log.info(
            f"  {kind:7s} {att[f'{kind}_mass']:6.1%} of the attention on an object covering "
            f"{att[f'{kind}_share']:5.1%} of the image: {att[f'{kind}_ratio']:.1f}x its share"
        )


def train_config(cfg: DemoConfig, store: Path, out: Path) -> TrainConfig:
    """How the demo runs fit on `store` (also the benchmark's second picture set, `benchmarks/hidden_set.py`)."""
    return TrainConfig(
        store=str(store),
        out=str(out),
        epochs=cfg.epochs,
        device="cpu",
        min_word_count=1,
        captions_per_image=cfg.captions_per_image,
        seed=cfg.seed,
        # model.pt by validation loss, not CIDEr-D: the demo's references are five fixed templates a picture, and
        # the CIDEr-D of one greedy caption against them measures which template it chose more than what it
        # names (it moved between 4.6 and 5.7 from epoch to epoch while the loss fell; chosen by it, model.pt
        # was epoch 12 of 24 and named shape in 92.7% of the test pictures, the last epoch in 95.8%)
        val_decode_images=0,
        finetune="layer4" if cfg.finetune else None,
        encoder_lr=cfg.encoder_lr,
        finetune_after=cfg.finetune_after if cfg.finetune else 0,
    )


def _run(cfg: DemoConfig) -> dict:
    """Each stage in turn, in the demo's folder. A long function: it is the demo's script, read top to bottom."""
    from pipeline.evaluate import EvaluateConfig, evaluate
    from pipeline.extract import ExtractConfig, extract
    from pipeline.generate import GenerateConfig, generate
    from pipeline.train import fit

    start = time.perf_counter()
    captions = make_dataset(cfg.out, cfg.images, cfg.size, cfg.seed)
    log.info(f"demo: drew {cfg.images} captioned images under {cfg.out}")
    weights = pick_weights(cfg.weights)
    store = cfg.out / "features.h5"
    layer = "layer3" if cfg.finetune else "layer4"  # fine-tuning layer4 trains from its input, layer3
    x = ExtractConfig(images=cfg.out, captions=captions, store=store, weights=weights, device="cpu", layer=layer)
    log.info(extract_line(extract(x)))  # the CLI's `done:` line (a new store: never None)
    fit(train_config(cfg, store, cfg.out))
    result = evaluate(
        EvaluateConfig(model=cfg.out / "model.pt", store=store, out=cfg.out / "scores.json", device="cpu")
    )
    print_scores(result)
    data = json.loads(captions.read_text(encoding="utf-8"))["images"]
    _report_attributes(
        result, cfg.out / "model.pt", store, {f"{e['filepath']}/{e['filename']}": e["attributes"] for e in data}
    )
    log.info("\ncaptions of test images next to one of their references:")
    for c in result["captions"][:6]:
        log.info(f"  {c['image']}: {c['caption']!r}   (reference: {c['references'][0]!r})")
    first = cfg.out / result["captions"][0]["image"]
    log.info("\ngenerate on one test image, with its attention figure:")
    for item in generate(
        GenerateConfig(images=[first], model=cfg.out / "model.pt", attention=cfg.out / "attention.png", device="cpu")
    ):
        log.info(caption_line(item))
    log.info(
        f"demo done in {time.perf_counter() - start:.0f}s: figure at {cfg.out / 'attention.png'}, "
        f"curves at {cfg.out / 'curves.png'}, scores at {cfg.out / 'scores.json'}"
    )
    return result["metrics"]
