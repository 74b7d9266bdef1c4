"""Section `cider`: CIDEr-D rewards for SCST, pipeline.cider.CiderD against pycocoevalcap 1.2's Cider, on real
Flickr30k captions.

    uv run python -m benchmarks.run --only cider            # ~10-20 s: the train split's df, 30 timed rounds
    uv run python -m benchmarks.run --only cider --quick    # a few seconds: 500 train images, 1 round

The batch is SCST's: 32 train images x 5 sampled captions, each scored against its image's 5 references.
"Samples" are a reference of the image with each word replaced, with probability 0.3, by a random word of the
corpus (what a partly trained model samples, roughly). pycocoevalcap scores the 160 (sample, references) pairs
in one `compute_score` call, recomputing everything (its document frequencies come from those 160 entries); ours
counts the train split's document frequencies once (`CiderD.from_references`, timed apart) and scores the
batch with `score_samples`, from text and from token ids (a (32, 5, T) array with <end> and padding).
"cold" is the first call on a batch of images whose references it has not seen (SCST's first epoch): their
tf-idf vectors are made then, and cached; "warm" is a call on a batch already seen. Rounds interleave the
scorers, so that load from other processes falls on all of them alike; median and min of the rounds.

The captions are tokenised as fit's validation tokenises them (`metrics.simple_tokenize`). As a check, ours
built from the batch's own references is compared with pycocoevalcap's per-caption scores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchmarkError, Context, Table, flickr

IMAGES, SAMPLES, SWAP = 32, 5, 0.3
PAD, START, END, UNK = 0, 1, 2, 3


def _batches(corpus: list[list[str]], rounds: int, rng: np.random.Generator) -> list[tuple[list, list]]:
    """`rounds` + 1 batches of distinct images: (references, samples) each."""
    pool = [w for refs in corpus[:2000] for c in refs for w in c.split()]
    picked = rng.choice(len(corpus), (rounds + 1) * IMAGES, replace=False).reshape(rounds + 1, IMAGES)
    out = []
    for images in picked:
        refs = [corpus[i][:5] for i in images]
        samples = [
            [
                " ".join(w if rng.random() > SWAP else pool[rng.integers(len(pool))] for w in r[k % len(r)].split())
                for k in range(SAMPLES)
            ]
            for r in refs
        ]
        out.append((refs, samples))
    return out


def _ids(samples: list[list[str]], index: dict[str, int]) -> np.ndarray:
    """(B, K, T) token ids, <end> after the words, then <pad>."""
    t = max(len(c.split()) for s in samples for c in s) + 1
    out = np.full((len(samples), len(samples[0]), t), PAD, np.int64)
    for b, s in enumerate(samples):
        for k, c in enumerate(s):
            words = [index[w] for w in c.split()]
            out[b, k, : len(words) + 1] = [*words, END]
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(ctx: Context) -> list[Table]:
    """The section; raises when ours and pycocoevalcap disagree (with the batch's own df)."""
    from pycocoevalcap.cider.cider import Cider

    from pipeline.cider import CiderD
    from pipeline.metrics import simple_tokenize

    train = flickr().train
    rounds = ctx.pick(1, 30)
    corpus = [[simple_tokenize(c) for c in caps] for caps in (train[:500] if ctx.quick else train)]
    rng = np.random.default_rng(0)
    batches = _batches(corpus, rounds, rng)
    words = ["<pad>", "<start>", "<end>", "<unk>", *sorted({w for refs in corpus for c in refs for w in c.split()})]
    index = {w: i for i, w in enumerate(words)}

    t0 = time.perf_counter()
    scorer = CiderD.from_references(corpus, words=words)
    build_s = time.perf_counter() - t0

    times: dict[str, list[float]] = {"pycocoevalcap": [], "ours, text (warm)": [], "ours, ids (warm)": []}
    times["ours, ids (cold)"] = []
    warm_refs, warm_samples = batches[0]
    warm_ids = _ids(warm_samples, index)
    scorer.score_samples(warm_ids, warm_refs, end_id=END, ignore_ids=(PAD, START, UNK))  # makes batch 0 warm
    for refs, samples in batches[1:]:
        gts = {(b, k): refs[b] for b in range(IMAGES) for k in range(SAMPLES)}
        res = {(b, k): [samples[b][k]] for b in range(IMAGES) for k in range(SAMPLES)}
        ids = _ids(samples, index)
        times["pycocoevalcap"].append(_timed(lambda g=gts, r=res: Cider().compute_score(g, r)))
        times["ours, ids (cold)"].append(
            _timed(lambda i=ids, r=refs: scorer.score_samples(i, r, end_id=END, ignore_ids=(PAD, START, UNK)))
        )
        times["ours, text (warm)"].append(_timed(lambda: scorer.score_samples(warm_samples, warm_refs)))
        times["ours, ids (warm)"].append(
            _timed(lambda: scorer.score_samples(warm_ids, warm_refs, end_id=END, ignore_ids=(PAD, START, UNK)))
        )

    # the check: with the batch's own document frequencies, ours is pycocoevalcap
    refs, samples = batches[1]
    gts = {i: refs[i // SAMPLES] for i in range(IMAGES * SAMPLES)}
    res = {i: [samples[i // SAMPLES][i % SAMPLES]] for i in range(IMAGES * SAMPLES)}
    _, theirs = Cider().compute_score(gts, res)
    ours = CiderD.from_references(list(gts.values())).score_samples(samples, refs).reshape(-1)
    same = float(np.abs(ours - theirs).max())
    text_vs_ids = float(
        np.abs(
            scorer.score_samples(warm_samples, warm_refs)
            - scorer.score_samples(warm_ids, warm_refs, end_id=END, ignore_ids=(PAD, START, UNK))
        ).max()
    )
    if not (same < 1e-6 and text_vs_ids < 1e-9):
        raise RuntimeError(f"CiderD disagrees: max |ours - pycocoevalcap| {same:.1e}, text vs ids {text_vs_ids:.1e}")

    base = float(np.median(times["pycocoevalcap"]))
    rows = [
        {
            "scorer": name,
            "median_ms": float(np.median(values)) * 1e3,
            "min_ms": float(np.min(values)) * 1e3,
            "speedup": base / float(np.median(values)),
        }
        for name, values in times.items()
    ]
    return [
        Table(
            f"cider: CIDEr-D of {IMAGES} images x {SAMPLES} samples, 5 references each (SCST's batch)",
            [
                ("scorer", "scorer", ""),
                ("median_ms", "median ms", ".2f"),
                ("min_ms", "min ms", ".2f"),
                ("speedup", "pycocoevalcap / this (median)", ".0f"),
            ],
            rows,
            [
                f"df corpus: {len(corpus):,} train images; CiderD.from_references took {build_s:.2f} s (once).",
                f"{rounds} interleaved round(s); max |ours - pycocoevalcap| with the batch's own df: {same:.1e}; "
                f"text vs ids: {text_vs_ids:.1e}.",
                "warm: the images' reference vectors cached; cold: the first call on those images.",
            ],
        )
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.bench_cider [--quick]`: the same as `benchmarks.run --only cider`, printed only."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cider", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 train images, 1 round: checks that it runs")
    args = parser.parse_args(argv)
    try:
        tables = run(Context(torch.device("cpu"), args.quick, Path(tempfile.gettempdir())))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t in tables:
        print(t.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
