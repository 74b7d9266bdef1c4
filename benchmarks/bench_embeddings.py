"""Random against word2vec initialisation of the word embeddings (`fit --embeddings`): validation loss and
CIDEr-D after the same number of epochs, everything else equal (same seed, so the same initial weights apart
from the embedding, the same batches).

    uv run python -m benchmarks.run --only embeddings           # section `embeddings`: both datasets (~an hour)
    uv run python -m benchmarks.run --only embeddings --quick   # tiny sizes, random and word2vec only
    uv run python -m benchmarks.bench_embeddings --only demo --seeds 0 1 2 --workdir /tmp/emb  # more options

(gensim comes with the dev group, or `uv sync --extra word2vec`; without it the section is skipped.) The
section adds its tables to the run's JSON file; this script's own main adds them to benchmarks/embeddings.json.

Datasets:
- `demo`: the demo's generated shapes (pipeline/demo/: make_dataset, extract --weights none, fit as demo()
  runs it: 12 epochs, 5 captions per image, every word kept).
- `flickr`: the real Flickr30k captions (Karpathy file in ../shared/data, read in place) of the first 2,000
  train and 400 val images, with random features in a real store: the images carry no information, so this
  measures the caption language model that the word vectors can help, as a loss curve over 3 epochs (fit's
  defaults: 1 caption per image, min word count 5).

Variants (all through pipeline.train.fit):
- `random`: nn.Embedding's N(0, 1) initialisation (the report's);
- `word2vec`: `--embeddings word2vec` (gensim, skip-gram, on the train captions only; centred and scaled to
  RMS 1 by pipeline.embeddings.centred);
- `word2vec-frozen`: the same with `--freeze-embeddings`;
- `word2vec-raw` (ablation, not a fit option): gensim's vectors as they are, not centred nor scaled (the
  option's first version: it measured worse than random, see BENCHMARKS.md);
- `word2vec-shuffled` (control, not a fit option): the word2vec vectors given to the wrong words (rows
  permuted): the same values and scale, no meaning.
Results are printed as Markdown and added to benchmarks/embeddings.json (kept across runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import ROOT, BenchmarkError, Context, Skipped, Table, make_store, quiet, require_data
from benchmarks.common import flickr as flickr_captions

VARIANTS = ("random", "word2vec", "word2vec-frozen", "word2vec-raw", "word2vec-shuffled")
DEFAULT_VARIANTS = {
    "demo": ["random", "word2vec", "word2vec-raw", "word2vec-frozen", "word2vec-shuffled"],
    "flickr": ["random", "word2vec", "word2vec-raw"],
}


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _transformed(variant: str, seed: int) -> Iterator[None]:
    """For the ablation and the control: change the matrix fit is about to copy into the model."""
    import pipeline.embeddings as embeddings

    if variant == "word2vec-raw":  # skip the centring
        original_centred = embeddings.centred
        embeddings.centred = lambda m: m
        try:
            yield
        finally:
            embeddings.centred = original_centred
        return
    if variant != "word2vec-shuffled":
        yield
        return
    original = embeddings.initial_vectors  # fit imports it from pipeline.embeddings when it runs

    def shuffled(*args, **kwargs):
        vectors = original(*args, **kwargs)
        m = vectors.matrix  # the word rows (after the 4 special tokens) permuted
        perm = np.random.default_rng(seed + 1000).permutation(len(m) - 4) + 4
        vectors.matrix = np.concatenate([m[:4], m[perm]])
        return vectors

    embeddings.initial_vectors = shuffled
    try:
        yield
    finally:
        embeddings.initial_vectors = original


WORKDIR_MARK = ".captioner-bench-embeddings"


def claim_workdir(path: Path) -> None:
    """`--workdir`: a new or empty folder, marked as this script's, or one it marked before. Its run folders are
    deleted and remade by every invocation, so a folder holding anything else is refused, untouched."""
    if path.exists() and not path.is_dir():
        raise BenchmarkError(f"--workdir {path} is a file, not a folder")
    if path.is_dir() and not (path / WORKDIR_MARK).is_file() and any(path.iterdir()):
        raise BenchmarkError(
            f"--workdir {path} is not empty and was not made by this script: nothing in it is touched; "
            "give a new or empty folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / WORKDIR_MARK).write_text("made by benchmarks/bench_embeddings.py, which deletes its runs here\n")


def fit_variant(store: Path, out: Path, variant: str, seed: int, **settings) -> dict:
    """One fit run; returns its per-epoch metrics and timings."""
    from pipeline.train import TrainConfig, fit

    shutil.rmtree(out, ignore_errors=True)  # its own run folder from an earlier invocation (claim_workdir)
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        device="cpu",
        seed=seed,
        embeddings="random" if variant == "random" else "word2vec",
        freeze_embeddings=variant == "word2vec-frozen",
        **settings,
    )
    t0 = time.perf_counter()
    with quiet() as buf, _transformed(variant, seed):
        fit(cfg)
    seconds = time.perf_counter() - t0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    w2v_line = next((line for line in buf.getvalue().splitlines() if line.startswith("embeddings:")), "")
    return {"variant": variant, "seed": seed, "epochs": epochs, "seconds": seconds, "embeddings_line": w2v_line}


def anisotropy(store: Path, min_word_count: int, seed: int = 0) -> str:
    """Mean cosine similarity between the word vectors fit starts from: word2vec's against N(0, 1)'s."""
    from pipeline.embeddings import Word2VecConfig, train_word2vec
    from pipeline.train import TrainConfig, prepare

    run = prepare(TrainConfig(store=str(store), device="cpu", min_word_count=min_word_count))
    captions = [t for caps in run.captions.references(run.train_rows) for t in caps]  # as fit gives word2vec
    run.store.close()
    with _transformed("word2vec-raw", seed):  # as gensim gives them
        w2v = train_word2vec(run.vocab, captions, 300, seed, Word2VecConfig()).matrix[4:]
    rnd = np.random.default_rng(seed).standard_normal(w2v.shape)

    def mean_cos(m: np.ndarray) -> float:
        u = m / np.linalg.norm(m, axis=1, keepdims=True)
        c = u @ u.T
        return float((c.sum() - len(c)) / (len(c) * (len(c) - 1)))

    rms = float(np.sqrt(np.mean(np.square(w2v))))
    return (
        f"mean cosine similarity between two words' initial vectors: word2vec as gensim gives them "
        f"{mean_cos(w2v):.2f}, centred {mean_cos(w2v - w2v.mean(0)):.2f}, random N(0, 1) {mean_cos(rnd):.2f}; "
        f"RMS of gensim's values {rms:.3f} (random: 1)"
    )


def _w2v_line(runs: list[dict]) -> str:
    return next((r["embeddings_line"] for r in runs if r["embeddings_line"]), "-")


def summary_table(title: str, runs: list[dict], notes: list[str]) -> Table:
    rows = []
    for r in runs:
        last = r["epochs"][-1]
        best = max(r["epochs"], key=lambda e: (e.get("val_cider_d", -1.0), -e["val_loss"]))
        rows.append(
            {
                "variant": r["variant"],
                "seed": r["seed"],
                "epochs": last["epoch"],
                "train_loss": last["train_loss"],
                "val_loss": last["val_loss"],
                "best_val_loss": min(e["val_loss"] for e in r["epochs"]),
                "val_cider_d": last.get("val_cider_d"),
                "best_cider": best.get("val_cider_d"),
                "best_epoch": best["epoch"],
                "seconds": r["seconds"],
            }
        )
    columns = [
        ("variant", "embeddings", ""),
        ("seed", "seed", "d"),
        ("epochs", "epochs", "d"),
        ("train_loss", "train loss (last)", ".3f"),
        ("val_loss", "val loss (last)", ".3f"),
        ("best_val_loss", "best val loss", ".3f"),
        ("val_cider_d", "val CIDEr-D (last)", ".3f"),
        ("best_cider", "best val CIDEr-D", ".3f"),
        ("best_epoch", "at epoch", "d"),
        ("seconds", "fit wall time", "dur"),
    ]
    return Table(title, columns, rows, notes)


def mean_table(title: str, runs: list[dict]) -> Table:
    """Per variant, the mean over seeds of the last epoch's validation loss and CIDEr-D."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        losses = [r["epochs"][-1]["val_loss"] for r in mine]
        ciders = [r["epochs"][-1].get("val_cider_d", float("nan")) for r in mine]
        rows.append(
            {
                "variant": variant,
                "seeds": len(mine),
                "val_loss": float(np.mean(losses)),
                "val_loss_range": f"{min(losses):.3f}-{max(losses):.3f}",
                "val_cider_d": float(np.mean(ciders)),
                "cider_range": f"{min(ciders):.3f}-{max(ciders):.3f}",
            }
        )
    columns = [
        ("variant", "embeddings", ""),
        ("seeds", "seeds", "d"),
        ("val_loss", "val loss (last epoch, mean)", ".3f"),
        ("val_loss_range", "range", ""),
        ("val_cider_d", "val CIDEr-D (last epoch, mean)", ".3f"),
        ("cider_range", "range", ""),
    ]
    return Table(title, columns, rows)


def curve_table(title: str, runs: list[dict], key: str = "val_loss") -> Table:
    """Epochs as rows, one column per run: the curve of `key`."""
    names = [f"{r['variant']} (seed {r['seed']})" for r in runs]
    n = max(len(r["epochs"]) for r in runs)
    rows = []
    for i in range(n):
        row: dict = {"epoch": i + 1}
        for name, r in zip(names, runs, strict=True):
            row[name] = r["epochs"][i].get(key) if i < len(r["epochs"]) else None
        rows.append(row)
    return Table(title, [("epoch", "epoch", "d")] + [(name, name, ".3f") for name in names], rows)


# -- the datasets --------------------------------------------------------------------------------------------


def demo(workdir: Path, quick: bool | str, seeds: list[int], variants: list[str]) -> tuple[list[Table], list[dict]]:
    from pipeline.demo import make_dataset
    from pipeline.extract import ExtractConfig, extract

    images, epochs, size = (120, 3, 224) if quick else (480, 12, 224)
    if quick == "smoke":  # benchmarks.run --quick: seconds, not figures
        images, epochs, size = (40, 1, 96)
    folder = workdir / (f"demo-{images}-{size}" if quick else "demo")
    store = folder / "features.h5"
    if store.exists():
        log(f"demo: reusing {store}")
    else:
        log(f"demo: drawing {images} images, extract --weights none")
        captions = make_dataset(folder, images, size, seed=0)
        with quiet():
            extract(ExtractConfig(images=folder, captions=captions, store=store, weights="none", device="cpu"))
    settings = {"epochs": epochs, "min_word_count": 1, "captions_per_image": 5, "val_decode_images": 100}
    runs = []
    for seed in seeds:
        for variant in variants:
            if seed != seeds[0] and variant not in ("random", "word2vec"):
                continue  # the ablations: first seed only
            log(f"demo: fit {variant}, seed {seed}, {epochs} epochs")
            runs.append(fit_variant(store, workdir / f"demo-{variant}-{seed}", variant, seed, **settings))
            log(f"   val loss {runs[-1]['epochs'][-1]['val_loss']:.3f} in {runs[-1]['seconds']:.0f}s")
    notes = [
        f"`pipeline.demo.make_dataset` ({images} images, 80/10/10 split), `extract --weights none`, then "
        f"`fit` as `demo()` runs it: {epochs} epochs, `--captions-per-image 5`, `--min-word-count 1`, "
        f"validation CIDEr-D on the {images // 10} val images (greedy), batch 32, Adam 1e-3",
        "`last` is the final epoch; `best` is the epoch fit would keep as model.pt (highest CIDEr-D)",
        "the word2vec line of the first run: " + _w2v_line(runs),
        anisotropy(store, 1),
    ]
    tables = [
        summary_table("Demo data: random against word2vec initialisation", runs, notes),
        mean_table("Demo data: mean over seeds (last epoch)", runs),
        curve_table("Demo data: validation CIDEr-D per epoch", runs, "val_cider_d"),
        curve_table("Demo data: validation loss per epoch", runs),
    ]
    return tables, runs


def flickr_store(workdir: Path, n_train: int, n_val: int) -> Path:
    """Random float16 features for the first train and val images of the Karpathy file, with their captions."""
    f = flickr_captions()
    train = f.train[:n_train]
    val = [caps for caps, split in zip(f.captions, f.splits, strict=True) if split == "val"][:n_val]
    path = workdir / f"flickr-{n_train}-{n_val}.h5"
    if path.exists():
        log(f"flickr: reusing {path}")
        return path
    return make_store(path, train + val, splits=["train"] * len(train) + ["val"] * len(val))


def flickr(workdir: Path, quick: bool | str, seeds: list[int], variants: list[str]) -> tuple[list[Table], list[dict]]:
    n_train, n_val, epochs = (400, 100, 2) if quick else (2000, 400, 3)
    if quick == "smoke":  # benchmarks.run --quick
        n_train, n_val, epochs = (64, 16, 1)
    log(f"flickr: a store of {n_train} train + {n_val} val images (random features, real captions)")
    store = flickr_store(workdir, n_train, n_val)
    settings = {"epochs": epochs, "val_decode_images": n_val // 2}
    runs = []
    for seed in seeds[:1]:
        for variant in variants:
            log(f"flickr: fit {variant}, seed {seed}, {epochs} epochs")
            runs.append(fit_variant(store, workdir / f"flickr-{variant}-{seed}", variant, seed, **settings))
            log(f"   val loss {runs[-1]['epochs'][-1]['val_loss']:.3f} in {runs[-1]['seconds']:.0f}s")
    notes = [
        f"the first {n_train:,} train and {n_val} val images of the Flickr30k Karpathy file, their real captions "
        "(5 each), random float16 features (|N(0, 1)|) in a store made with pipeline.store",
        f"`fit` with its defaults (batch 32, Adam 1e-3, 1 caption per image per epoch, min word count 5 on "
        f"train), {epochs} epochs, validation loss on all 5 captions of each val image, CIDEr-D on "
        f"{n_val // 2} val images (greedy)",
        "with random features the model can only learn the captions' language: the loss curve is the measure; "
        "CIDEr-D scores one generic caption for every image",
        "the word2vec line: " + _w2v_line(runs),
        anisotropy(store, 5),
    ]
    tables = [
        summary_table("Flickr30k captions, random features: random against word2vec", runs, notes),
        curve_table("Flickr30k captions, random features: validation loss per epoch", runs),
        curve_table("Flickr30k captions, random features: train loss per epoch", runs, "train_loss"),
    ]
    return tables, runs


DATASETS = {"demo": demo, "flickr": flickr}


def run(ctx: Context) -> list[Table]:
    """The section: both datasets, their default variants (quick: random and word2vec, tiny sizes), seeds 0 and 1
    on the demo (quick: 0)."""
    try:
        import gensim  # noqa: F401
    except ImportError:
        raise Skipped("the word2vec runs need gensim: uv sync --extra word2vec") from None
    if ctx.device.type != "cpu":
        raise Skipped("measured on the CPU only (fit's quality, not its speed); run it without --device cuda")
    tables: list[Table] = []
    (ctx.workdir / "embeddings").mkdir(exist_ok=True)
    for name, dataset in DATASETS.items():
        variants = ["random", "word2vec"] if ctx.quick else DEFAULT_VARIANTS[name]
        seeds = [0] if ctx.quick else [0, 1]
        tables += dataset(ctx.workdir / "embeddings", "smoke" if ctx.quick else False, seeds, variants)[0]
    return tables


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import machine, machine_table, save

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, numbers meaningless")
    parser.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="demo: seeds for random and word2vec")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: per dataset (see the docstring)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "embeddings.json")
    parser.add_argument("--workdir", type=Path, help="keep stores and runs here (reused by later invocations)")
    parser.add_argument("--threads", type=int, help="torch threads (1 helps on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workdir:
        try:
            claim_workdir(args.workdir)
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    try:
        import gensim  # noqa: F401
    except ImportError:
        print("error: the word2vec runs need gensim: uv sync --extra word2vec", file=sys.stderr)
        return 1
    try:
        if "flickr" in args.only:
            require_data()
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = machine(torch.device("cpu"))
    print(machine_table(info, started, args.quick), flush=True)
    entry: dict = {"started": started, "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv}
    entry |= {"machine": info, "datasets": {}}
    t_all = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = str(args.workdir)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-embeddings-"))
        for name in args.only:
            t0 = time.perf_counter()
            variants = args.variants or DEFAULT_VARIANTS[name]
            tables, runs = DATASETS[name](Path(tmp), args.quick, args.seeds, variants)
            entry["datasets"][name] = {
                "seconds": time.perf_counter() - t0,
                "runs": runs,
                "tables": [t.to_json() for t in tables],
            }
            for t in tables:
                print(t.markdown(), flush=True)
    entry["seconds"] = time.perf_counter() - t_all
    key = f"{started} | {info['cpu']} x{info['cores']}" + (" | quick" if args.quick else "")
    save(args.out, key, entry)
    print(f"total {entry['seconds']:.0f} s; results added to {args.out} as {key!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
