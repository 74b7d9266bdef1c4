"""Section `fit`: the report's end-to-end loop (benchmarks/reference.py) against our decoder trained from the
store, at the same vocabulary size and batch 32, for two vocabulary sizes."""

from __future__ import annotations

import numpy as np

from benchmarks.common import (
    EPOCH_IMAGES,
    EPOCHS,
    VOCAB_RULES,
    Context,
    OurTraining,
    Table,
    Timing,
    flickr,
    measure,
    vocabulary,
    write_jpegs,
)
from benchmarks.reference import ReferenceLoop, report_encoder

BATCH = 32  # the report's (--quick: 4, a smoke run)


def _row(model: str, rule: str, vocab_size: int, cpi: int, t: Timing, batch: int) -> dict:
    epoch_s = EPOCH_IMAGES * cpi / t.rate
    return {
        "model": model,
        "vocabulary": rule,
        "vocab_size": vocab_size,
        "batch": batch,
        "captions_per_image": cpi,
        "batches_timed": t.steps,
        "seconds_timed": t.seconds,
        "samples_per_s": t.rate,
        "epoch_s": epoch_s,
        "epochs50_s": epoch_s * EPOCHS,
    }


def run(ctx: Context) -> list[Table]:
    from pipeline.store import FeatureStore

    dev = ctx.device
    batch = ctx.pick(4, BATCH)
    store = FeatureStore(ctx.flickr_store())
    n_images = len(store)
    images = write_jpegs(ctx.workdir / "fit-jpegs", 64, seed=1)
    ref_captions = flickr().train[:n_images]
    ref_sizes = {"warmup": ctx.pick(0, 1), "min_steps": 1, "max_steps": ctx.pick(1, 5), "budget_s": ctx.pick(0, 45)}
    our_sizes = {"warmup": ctx.pick(1, 2), "min_steps": ctx.pick(1, 10), "max_steps": ctx.pick(1, 60),
                 "budget_s": ctx.pick(0, 15)}  # fmt: skip

    rows, breakdown = [], []
    encoder = report_encoder()
    for rule in ("report", "ours"):
        vocab = vocabulary(rule)
        v = len(vocab)
        ctx.log(f"reference, vocabulary {v} ({rule} rule)")
        ref = ReferenceLoop(images, ref_captions, vocab.stoi, v, dev, batch, encoder=encoder)
        t_ref = measure(ref.step, dev, **ref_sizes)
        ref_row = _row("reference (report loop)", rule, v, 1, t_ref, batch)
        parts = np.array(ref.breakdown[-t_ref.steps :]).mean(axis=0)
        total = float(parts.sum())
        breakdown.append(
            {"vocab_size": v, "decode_s": parts[0], "encoder_s": parts[1], "decoder_s": parts[2], "total_s": total}
            | {f"{k}_share": float(p) / total for k, p in zip(("decode", "encoder", "decoder"), parts, strict=True)}
        )
        del ref

        ctx.log(f"ours, vocabulary {v} ({rule} rule)")
        ours = OurTraining(store, vocab, batch, 1, dev)
        try:
            t_ours = measure(ours.step, dev, **our_sizes)
        finally:
            ours.close()
        our_row = _row("ours (fit from the store)", rule, v, 1, t_ours, batch)
        ref_row["ratio"] = 1.0
        our_row["ratio"] = t_ours.rate / t_ref.rate
        rows += [ref_row, our_row]
        if dev.type == "cpu":
            ctx.log(f"ours with --amp (bf16 autocast on the CPU), vocabulary {v}")
            ours_bf16 = OurTraining(store, vocab, batch, 1, dev, amp=True)
            try:
                t_bf16 = measure(ours_bf16.step, dev, **our_sizes)
            finally:
                ours_bf16.close()
            bf16_row = _row("ours, fit --amp (bf16 on CPU)", rule, v, 1, t_bf16, batch)
            bf16_row["ratio"] = t_bf16.rate / t_ref.rate
            rows.append(bf16_row)
        if rule == "ours":
            ctx.log(f"ours, vocabulary {v}, 5 captions per image")
            ours5 = OurTraining(store, vocab, batch, 5, dev)
            try:
                t5 = measure(ours5.step, dev, **our_sizes)
            finally:
                ours5.close()
            row5 = _row("ours, captions_per_image=5", rule, v, 5, t5, batch)
            row5["ratio"] = t5.rate / t_ref.rate
            rows.append(row5)
    del encoder
    store.close()

    main = Table(
        f"fit: the report's loop vs ours (batch {batch}, same vocabulary size)",
        [
            ("model", "model", ""),
            ("vocabulary", "vocab rule", ""),
            ("vocab_size", "V", ","),
            ("captions_per_image", "captions/img", "d"),
            ("batches_timed", "batches timed", "d"),
            ("samples_per_s", "samples/s", ",.1f"),
            ("epoch_s", "epoch (29k images, projected)", "dur"),
            ("epochs50_s", "50 epochs (projected)", "dur"),
            ("ratio", "ours / reference", ".1f"),
        ],
        rows,
        [
            "samples are captions: with captions_per_image=5 an epoch is 29,000 images x 5 = 145,000 captions.",
            f"epoch and 50-epoch times are projections: {EPOCH_IMAGES:,} x captions/img / measured samples/s "
            "(a few timed batches after a warm-up), not measured epochs.",
            "vocab rules: " + "; ".join(f"{k} = {d}" for k, d in VOCAB_RULES.items()) + ".",
            "ratio: samples/s over the reference's at the same V (for captions/img 5: captions/s over images/s).",
            f"reference = JPEG decode + ResNet50 + report decoder per step, on {len(images)} synthetic 500x375 "
            f"JPEGs reused; ours = random float16 features of {n_images} images in a real store, real captions.",
            "ours also stops each batch at its longest caption (<= 19 steps); the reference always runs 19.",
            "--amp rows: bf16 autocast, opt-in on CPU (this CPU has avx512_bf16); the reference is float32, so the "
            "float32 rows are the like-for-like comparison.",
            "the report measured ~3.6 min per 25,426-image epoch on its GPU (50 epochs in 3 hours).",
        ],
    )
    parts_table = Table(
        f"fit: where a reference batch's time goes (mean per batch of {batch})",
        [
            ("vocab_size", "V", ","),
            ("decode_s", "JPEG decode + transform (s)", ".3f"),
            ("encoder_s", "ResNet50 forward (s)", ".3f"),
            ("decoder_s", "decoder fwd+bwd+Adam (s)", ".3f"),
            ("total_s", "total (s)", ".3f"),
            ("encoder_share", "ResNet50 share", ".0%"),
        ],
        breakdown,
    )
    return [main, parts_table]
