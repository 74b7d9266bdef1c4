"""Section `generate`: process start to the first caption line of `cli.py generate`, and the warm per-image
latency of pipeline.captioner.Captioner at beam 1 and the default beam (3)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, Context, Table, flickr, median, quiet, write_jpegs, write_karpathy
from pipeline.config import BEAM_SIZE


def _tiny_model(ctx: Context, folder: Path, paths: list[Path]) -> tuple[Path, dict]:
    """A store made by pipeline.extract (--weights none) and a model trained 1 epoch by pipeline.train.fit."""
    from pipeline.extract import ExtractConfig, extract
    from pipeline.train import TrainConfig, fit

    n = len(paths)
    splits = ["val" if i % 4 == 3 else "train" for i in range(n)]
    captions = write_karpathy(folder / "dataset_flickr30k.json", [p.name for p in paths], flickr().train[:n], splits)
    store = ctx.workdir / "generate-store.h5"
    out = ctx.workdir / "generate-model"
    ctx.log(f"tiny model: extract {n} images (--weights none), fit 1 epoch")
    with quiet():
        extract(ExtractConfig(images=folder, captions=captions, store=store, weights="none", device=ctx.device.type))
        record = fit(TrainConfig(store=str(store), out=str(out), epochs=1, batch_size=8, device=ctx.device.type))
    return out / "model.pt", record


def _cold_start(model: Path, image: Path, device: str) -> tuple[float, float]:
    """Seconds from Popen to the first caption line on stdout, and to the process's exit."""
    cmd = [sys.executable, "cli.py", "generate", "--image", str(image), "--model", str(model), "--device", device]
    err = model.parent / "generate-stderr.txt"
    with open(err, "w") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        first = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if first is None and line.startswith(f"{image}:"):
                first = time.perf_counter() - t0
        code = proc.wait()
        total = time.perf_counter() - t0
    if code != 0 or first is None:
        raise RuntimeError(f"cli.py generate exited {code} without a caption: {err.read_text()[-2000:]}")
    return first, total


def run(ctx: Context) -> list[Table]:
    dev = ctx.device
    folder = ctx.workdir / "generate-images"
    paths = write_jpegs(folder, ctx.pick(8, 32), seed=3)
    model, record = _tiny_model(ctx, folder, paths)
    rows = []

    runs = ctx.pick(1, 3)
    ctx.log(f"cli.py generate, {runs} cold start(s)")
    starts = [_cold_start(model, paths[0], dev.type) for _ in range(runs)]
    firsts, totals = [s[0] for s in starts], [s[1] for s in starts]
    cold = {"beam": BEAM_SIZE, "runs": runs}
    rows.append({"what": "cli.py generate: start -> first caption line"} | cold | _stats(firsts))
    rows.append({"what": "cli.py generate: start -> exit"} | cold | _stats(totals))

    ctx.log("Captioner, warm per-image latency")
    rows += _warm(ctx, model, paths)
    return [
        Table(
            f"generate: latency on {dev.type}",
            [
                ("what", "what", ""),
                ("beam", "beam", "d"),
                ("runs", "runs", "d"),
                ("median_s", "median s", ".3f"),
                ("min_s", "min s", ".3f"),
                ("max_s", "max s", ".3f"),
            ],
            rows,
            [
                f"cold start: `{Path(sys.executable).name} cli.py generate --image X --model M --device {dev.type}` "
                "as a subprocess (the venv's python; `uv run` adds its own start-up); the first run may also pay "
                "for a cold file cache.",
                f"the model: 1 epoch of fit on a tiny store made by extract --weights none "
                f"({len(paths)} images); its vocabulary is tiny, so its checkpoint loads faster than a real "
                "model's would (the ResNet50 and the imports dominate).",
                "warm: one image at a time, timed from the JPEG file to the caption text, after 2 warm-up images.",
                f"fit's epoch on the tiny store: {record.get('seconds', float('nan')):.2f} s.",
            ],
        )
    ]


def _warm(ctx: Context, model: Path, paths: list[Path]) -> list[dict]:
    """Captioner.load, then one image at a time from the file to the caption text, at beam 1 and 3."""
    from pipeline.captioner import Captioner
    from pipeline.transform import open_image, resize_uint8

    dev = ctx.device
    t0 = time.perf_counter()
    captioner = Captioner.load(model, dev)
    rows = [{"what": "Captioner.load (in process, after imports)", "runs": 1} | _stats([time.perf_counter() - t0])]

    def caption(path: Path, beam: int) -> str:
        img = open_image(path, captioner.transform)
        pixels = resize_uint8(img, captioner.transform).unsqueeze(0)
        return captioner.vocab.decode(captioner.caption(pixels, beam)[0].tokens)

    for beam in (1, BEAM_SIZE):
        for p in paths[-ctx.pick(1, 2) :]:  # warm-up
            caption(p, beam)
        times = []
        for p in paths[: ctx.pick(2, 10)]:
            t0 = time.perf_counter()
            caption(p, beam)
            times.append(time.perf_counter() - t0)
        rows.append({"what": "warm, per image (decode + ResNet50 + search)", "beam": beam, "runs": len(times)})
        rows[-1] |= _stats(times)
    return rows


def _stats(values: list[float]) -> dict:
    return {"median_s": median(values), "min_s": min(values), "max_s": max(values), "values_s": values}
