"""What the benchmark sections share: the real captions, synthetic JPEGs and stores, timing, memory sampling,
our training step, and the Markdown tables."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.console import terminal_logging
from pipeline.store import row_bytes

if TYPE_CHECKING:
    from pipeline.store import FeatureStore
    from pipeline.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
# CAPTIONER_BENCHMARK_DATA: the same layout elsewhere (on a GPU machine, where ../shared does not travel)
SHARED_DATA = Path(os.environ.get("CAPTIONER_BENCHMARK_DATA") or ROOT.parent / "shared" / "data")
KARPATHY_FILE = SHARED_DATA / "flickr30k-captions" / "dataset_flickr30k.json.gz"
EPOCH_IMAGES = 29_000  # Flickr30k Karpathy train split: every per-epoch figure is projected to this
EPOCHS = 50  # the report's run
FLICKR_SIZE = (500, 375)  # width, height of a typical Flickr30k photo
ROW_BYTES = row_bytes("float16")  # one image's float16 layer4 features


class BenchmarkError(Exception):
    """A problem that stops the benchmarks with one clear line (the shared data missing, no GPU...)."""


class Skipped(Exception):
    """Raised by a section that cannot run here (a GPU-sized section on the CPU, an optional package absent),
    after its imports and setup ran: the run prints the reason and goes on."""


# -- the real captions -------------------------------------------------------------------------------------


def require_data() -> Path:
    """The Karpathy-layout Flickr30k captions, read in place (never copied into the repository)."""
    if not KARPATHY_FILE.is_file():
        raise BenchmarkError(
            f"the real Flickr30k captions are needed at {KARPATHY_FILE} "
            f"(the shared data folder {SHARED_DATA}, next to the repository), and they are not there"
        )
    return KARPATHY_FILE


@dataclass(frozen=True, eq=False)  # hashed by identity: vocabulary() caches per captions set
class Flickr:
    train: list[list[str]]  # the captions of each train image, in file order
    all_texts: list[str]  # every caption of every split
    captions: list[list[str]]  # the captions of every image, in file order
    splits: list[str]  # each image's split, in file order (restval as train)
    synthetic: bool = False  # made-up captions (`--quick` without the real file), not Flickr30k's


QUICK_IMAGES = 1200  # --quick: the captions of the file's first images only (a smaller vocabulary, a faster step)
_QUICK = False


def quick_captions() -> bool:
    """For `--quick` smoke runs: `flickr()` returns the captions of the file's first QUICK_IMAGES images, or,
    when the real file is absent, made-up captions of the same shape instead of stopping, so that a clean clone
    without ../shared still runs every section. Returns whether the made-up captions are in use."""
    global _QUICK
    _QUICK = True
    return not KARPATHY_FILE.is_file()


def flickr() -> Flickr:
    """The Flickr30k captions; after `quick_captions()`, the first images' only, or made-up ones."""
    if _QUICK:
        return synthetic_flickr(QUICK_IMAGES) if not KARPATHY_FILE.is_file() else _first_images(QUICK_IMAGES)
    return real_flickr()


@lru_cache(maxsize=1)
def _first_images(n: int) -> Flickr:
    f = real_flickr()
    captions, splits = f.captions[:n], f.splits[:n]
    train = [caps for caps, split in zip(captions, splits, strict=True) if split == "train"]
    return Flickr(train, [c for caps in captions for c in caps], captions, splits)


@lru_cache(maxsize=1)
def real_flickr() -> Flickr:
    """The captions as extract reads them (`pipeline.datasets.read_karpathy`: `sentences[].raw`, white space
    collapsed, NFC, empty ones dropped, `restval` counted as train), in file order."""
    from collections import Counter

    from pipeline.datasets import read_karpathy

    entries = list(read_karpathy(require_data(), Counter()).values())
    captions = [e.captions for e in entries if e.captions]
    splits = [e.split or "train" for e in entries if e.captions]
    train = [caps for caps, split in zip(captions, splits, strict=True) if split == "train"]
    return Flickr(train, [c for caps in captions for c in caps], captions, splits)


@lru_cache(maxsize=1)
def synthetic_flickr(images: int) -> Flickr:
    """Made-up captions in Flickr30k's shape (5 an image, 6-16 words, a vocabulary of ~100 words, 90/5/5
    train/val/test): enough for every section's `--quick` sizes, never for figures."""
    rng = np.random.default_rng(0)
    who = ("man", "woman", "boy", "girl", "dog", "child", "worker", "player", "group", "crowd", "cyclist", "dancer")
    looks = ("young", "old", "small", "tall", "smiling", "happy", "tired", "busy")
    doing = ("is walking", "is running", "is sitting", "is standing", "is climbing", "is riding a bike", "is playing")
    where = ("on the street", "in the park", "near the water", "on a beach", "in a field", "at the market",
             "on a stage", "in the snow", "by a wall", "under a tree")  # fmt: skip
    extra = ("with a red shirt", "with a blue hat", "holding a ball", "next to a car", "in front of a building", "")
    captions, splits = [], []
    for i in range(images):
        caps = []
        for _ in range(5):
            words = [rng.choice(looks), rng.choice(who), rng.choice(doing), rng.choice(where), rng.choice(extra)]
            caps.append(" ".join(f"A {' '.join(words)} .".split()))
        captions.append(caps)
        splits.append("val" if i % 20 == 18 else "test" if i % 20 == 19 else "train")
    train = [caps for caps, split in zip(captions, splits, strict=True) if split == "train"]
    return Flickr(train, [c for caps in captions for c in caps], captions, splits, synthetic=True)


VOCAB_RULES = {
    "report": "every word of all captions, train+val+test (min count 1), as the report did",
    "ours": "min count 5 on the train split (fit's default)",
}


def vocabulary(rule: str) -> Vocabulary:
    """The vocabulary of the whole Flickr30k file under `rule` (a key of VOCAB_RULES)."""
    return _vocabulary(rule, flickr())


@cache
def _vocabulary(rule: str, f: Flickr) -> Vocabulary:
    from pipeline.vocab import Vocabulary

    if rule == "report":
        return Vocabulary.build(f.all_texts, 1)
    if rule == "ours":
        return Vocabulary.build((c for caps in f.train for c in caps), 5)
    raise ValueError(rule)


# -- synthetic images and stores ---------------------------------------------------------------------------


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct 500x375 JPEGs (smooth colour fields plus grain, ~100 KB like real Flickr photos)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = FLICKR_SIZE
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        base = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.standard_normal((h, w, 3), dtype=np.float32) * 18.0
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def write_karpathy(path: Path, names: Sequence[str], captions: Sequence[Sequence[str]], splits: Sequence[str]) -> Path:
    """A captions file in Karpathy's dataset_*.json layout."""
    images = [
        {"filename": n, "split": s, "sentences": [{"raw": c} for c in caps]}
        for n, caps, s in zip(names, captions, splits, strict=True)
    ]
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}), encoding="utf-8")
    return path


def random_features(rng: np.random.Generator, n: int, layer: str = "layer4") -> np.ndarray:
    """(n, 7, 7, 2048) (or layer3's (n, 14, 14, 1024)) float16, non-negative like post-ReLU ResNet features."""
    from pipeline.encoder import FEATURE_SHAPES

    return np.abs(rng.standard_normal((n, *FEATURE_SHAPES[layer]), dtype=np.float32)).astype(np.float16)


def make_store(
    path: Path,
    captions: Sequence[Sequence[str]],
    seed: int = 0,
    block: int = 256,
    repeat_block: bool = False,
    layer: str = "layer4",
    splits: Sequence[str] | None = None,
) -> Path:
    """A complete float16 store made with pipeline.store (create + Writer) holding random features of `layer`
    (a layer3 store's layer4 is the seeded random one). repeat_block: write the same random block again and
    again (fast, for multi-GB stores). splits: each image's split (default: all train)."""
    from pipeline import store as st
    from pipeline.datasets import CaptionSet
    from pipeline.encoder import WeightsInfo
    from pipeline.extract import provenance
    from pipeline.transform import TransformConfig

    n = len(captions)
    caption_set = CaptionSet(
        images=[f"img{i:06d}.jpg" for i in range(n)],
        captions=[list(c) for c in captions],
        splits=list(splits) if splits is not None else ["train"] * n,
        layout="karpathy",
        source=Path("synthetic"),
    )
    st.create(path, caption_set, provenance(WeightsInfo("none", "").to_dict(), TransformConfig(), "float16", layer))
    rng = np.random.default_rng(seed)
    fixed = random_features(rng, block, layer) if repeat_block else None
    writer = st.Writer(path)
    try:
        for start in range(0, n, block):
            rows = np.arange(start, min(start + block, n))
            feats = fixed[: len(rows)] if fixed is not None else random_features(rng, len(rows), layer)
            writer.write(rows, feats, st.WRITTEN)
        writer.finish()
    finally:
        writer.close()
    return path


def evict(path: Path) -> bool:
    """Drop the file's clean pages from the page cache (posix_fadvise DONTNEED). Pages some process still
    maps are kept: unmap them first (see `unmap`). On a VM the host may still cache the file."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def unmap(features: np.ndarray) -> None:
    """Release a numpy memory map's pages from this process (they stay in the page cache)."""
    import mmap

    m = getattr(features, "_mmap", None)
    if m is not None and hasattr(m, "madvise"):
        m.madvise(mmap.MADV_DONTNEED)


def read_through(path: Path) -> None:
    """Read a whole file once so that it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


# -- timing --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    steps: int
    samples: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


def measure(
    step: Callable[[], int], device: torch.device, warmup: int, min_steps: int, max_steps: int, budget_s: float
) -> Timing:
    """Run `warmup` untimed steps, then time at least `min_steps` and at most `max_steps` steps, stopping
    once `budget_s` seconds have passed. `step` returns the samples it processed."""
    for _ in range(warmup):
        step()
    sync(device)
    samples = steps = 0
    t0 = time.perf_counter()
    while steps < max_steps and (steps < min_steps or time.perf_counter() - t0 < budget_s):
        samples += step()
        steps += 1
    sync(device)
    return Timing(steps, samples, time.perf_counter() - t0)


def median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else math.nan


# -- memory ---------------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of this process, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


class RssSampler:
    """Samples /proc/self/status in a thread; start, peak and end of RssAnon and RssFile."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self) -> None:
        now = proc_status()
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record()

    def __enter__(self) -> RssSampler:
        self.start = proc_status()
        self._record()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        self.end = proc_status()


# -- running pipeline code quietly ----------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Capture what pipeline code reports (its log lines, as the CLI prints them, and progress lines); shown
    on stderr only if it fails."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), terminal_logging():
            yield buf
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


# -- our training step, exactly as pipeline.train.fit runs it ---------------------------------------------


class InMemory:
    """Stands in for a FeatureStore in `Batches` (a `data.FeatureRows`): the same features copied into RAM as
    a numpy array (the CPU counterpart of `Batches.make_resident`)."""

    def __init__(self, store: FeatureStore) -> None:
        self.features = np.array(store.features)

    def __len__(self) -> int:
        return len(self.features)

    def prefetch(self, rows: np.ndarray) -> None:
        """Nothing to read ahead: the rows are in RAM."""


class OurTraining:
    """pipeline.model.Decoder trained by fit's own pieces: Batches (memory map or resident, prefetch thread),
    `train.make_optimizer` (Adam 1e-3) and `train.train_step` (autocast as fit's --amp, masked loss, clip 5).
    `step()` runs one batch and returns the captions it trained on; epochs follow each other as in fit.
    With `encoder` (a layer4 head, on a layer3 store): fit --finetune layer4's model, a CaptionModel whose layer4
    trains at `encoder_lr` (or runs frozen with trainable=False), the feature scale measured on its output."""

    def __init__(
        self,
        store: FeatureStore,
        vocab: Vocabulary,
        batch_size: int,
        captions_per_image: int,
        device: torch.device,
        source: str = "mmap",  # mmap | resident
        seed: int = 0,
        amp: bool | None = None,  # fit's --amp: None = bf16 on CUDA only
        encoder: torch.nn.Module | None = None,
        encoder_lr: float = 1e-4,
        trainable: bool = True,
    ) -> None:
        from pipeline.data import Batches, CaptionIndex, feature_scale
        from pipeline.model import CaptionModel, Decoder, DecoderConfig, run_encoder
        from pipeline.train import TrainConfig, make_optimizer
        from pipeline.vocab import MAX_LEN

        rows = store.split_rows("train")
        captions = CaptionIndex.build(vocab, store.caption_text, store.caption_image, len(store), MAX_LEN)
        features: Any = store
        if source == "resident" and device.type == "cpu":
            features = InMemory(store)
        self.batches = Batches(features, captions, rows, batch_size, captions_per_image, device)
        if source == "resident" and device.type == "cuda":
            self.batches.make_resident()
        torch.manual_seed(seed)
        encode = None
        if encoder is not None:
            encoder = encoder.to(device).requires_grad_(trainable)
            encode = lambda x: run_encoder(encoder, x.to(device))  # noqa: E731
        cfg = DecoderConfig(vocab_size=len(vocab), feature_scale=feature_scale(store.features, rows, encode=encode))
        from pipeline.loss import CaptionTraining

        self.model: torch.nn.Module = Decoder(cfg).to(device)
        if encoder is not None:
            self.model = CaptionModel(self.model, encoder, train_encoder=trainable).to(device)
        self.model.train()
        self.module = CaptionTraining(self.model)
        self.optimizer = make_optimizer(self.model, 1e-3, encoder_lr)
        self.cfg = TrainConfig(amp=amp)
        self.device, self.seed = device, seed
        self.loss_sum = torch.zeros((), device=device)
        self._batches = self._forever()

    def _forever(self) -> Iterator:
        epoch = 1
        while True:
            yield from self.batches.iterate(epoch, self.seed)
            epoch += 1

    def step(self) -> int:
        from pipeline.train import train_step

        batch = next(self._batches)
        self.loss_sum += train_step(self.module, self.optimizer, batch, self.cfg)
        return batch.tokens.shape[0] * batch.tokens.shape[1]

    def close(self) -> None:
        self._batches.close()  # stops the prefetch thread


# -- tables ------------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """1234 -> '20.6 min'; for the projected epoch figures."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass
class Table:
    """One Markdown table; `columns` are (row key, header, format: a format spec, 'dur' or '')."""

    title: str
    columns: list[tuple[str, str, str]]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _cell(value: object, fmt: str) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        if fmt == "dur":
            return duration(float(value))  # type: ignore[arg-type]
        if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, fmt)
        return str(value)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(h for _, h, _ in self.columns) + " |")
        lines.append("|" + "|".join("---" if f == "" else "---:" for _, _, f in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(self._cell(row.get(k), f) for k, _, f in self.columns) + " |")
        lines.extend(f"\n- {n}" if i == 0 else f"- {n}" for i, n in enumerate(self.notes))
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"title": self.title, "rows": self.rows, "notes": self.notes}


# -- the run's context ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """The device, the size preset and a scratch folder (deleted after the run) shared by the sections."""

    device: torch.device
    quick: bool
    workdir: Path
    _stores: dict[str, Path] = field(default_factory=dict)

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def log(self, message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    def flickr_store(self) -> Path:
        """A float16 store (pipeline.store.create + Writer) of random features for the first N Flickr30k
        train images, with their real captions; made once per run."""
        if "flickr" not in self._stores:
            n = self.pick(128, 2000)
            kind = "made-up" if flickr().synthetic else "real Flickr30k"
            self.log(f"writing a store of {n} images (random features, {kind} captions)")
            path = self.workdir / "flickr.h5"
            self._stores["flickr"] = make_store(path, flickr().train[:n])
        return self._stores["flickr"]
