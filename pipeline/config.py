"""The settings of every command (extract, fit, evaluate, generate, serve, demo): one dataclass per command,
every default declared once.

`cli.py` takes its option defaults from these classes, so a default is written in one place only
(tests/cli/test_cli.py fails on a drift). This module imports neither torch, numpy nor typer: `cli.py --help`
stays fast (importing torch takes seconds). `pipeline.extract.ExtractConfig`, `pipeline.train.TrainConfig`,
`pipeline.serve.ServeConfig`, ... are these same classes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.transform import TransformConfig

MAX_LEN = 20  # tokens per encoded caption, <start> and <end> included (the report's 20)
STORE = "cache/features.h5"
OUT = "cache"
MODEL = "cache/model.pt"
DEVICE = "auto"  # cuda when available, else cpu
BEAM_SIZE = 3
MAX_BEAM_SIZE = 50  # a wider beam only costs memory: (images x beam x vocabulary) log-probabilities per step
EVAL_SPLITS = ("test", "val")  # what evaluate scores; never train, the captions the model learned
FEATURE_NORMS = ("channel", "rms", "none")  # TrainConfig.feature_norm
LR_SCHEDULES = ("constant", "cosine")  # TrainConfig.lr_schedule
FINETUNE_LAYERS = ("layer4",)  # TrainConfig.finetune
SCST_BASELINES = ("mean", "greedy")  # TrainConfig.scst_baseline (pipeline/scst.py)
# ExtractConfig.decode (extract --decode): where JPEGs are decoded. auto: on the GPU when the device is CUDA
# (nvjpeg), else on the CPU (Pillow, in the workers); gpu: on the GPU or an error; cpu: always Pillow
DECODE_MODES = ("auto", "cpu", "gpu")


def wait_passively() -> None:
    """Make torch's CPU threads (OpenMP) sleep between parallel regions instead of spinning, unless the user
    set OMP_WAIT_POLICY. Called before torch is imported (OpenMP reads it once, when torch loads) by cli.py and
    by the benchmarks, which measure what the commands run. When anything else shares the cores, a spinning
    team waits at each of a ResNet50 forward's ~170 regions for a partner that is not running: on 2 shared
    cores, 2.3-4.9 s a forward against 0.12-0.27 s. Its price on a quiet machine is a wake-up at each region:
    a beam search step's matmuls pay it (BENCHMARKS.md, latency; docs/speed.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _transform() -> TransformConfig:
    from pipeline.transform import TransformConfig  # imports torch: only when an ExtractConfig is made

    return TransformConfig()


def _pillow_max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # Pillow's decompression-bomb warning level


@dataclass
class ExtractConfig:
    """`extract`."""

    images: Path
    captions: Path | None = None
    store: Path = Path(STORE)
    weights: str = "IMAGENET1K_V1"
    batch_size: int = 64
    workers: int | None = None  # None: runtime.default_workers()
    device: str = DEVICE
    dtype: str = "float16"
    overwrite: bool = False
    layer: str = "layer4"  # the ResNet50 stage stored: layer4 (7x7x2048) or layer3 (14x14x1024)
    decode: str = DECODE_MODES[0]  # where JPEGs are decoded: auto, cpu or gpu (DECODE_MODES)
    transform: TransformConfig = field(default_factory=_transform)


@dataclass
class Word2VecConfig:
    """gensim Word2Vec parameters for `fit --embeddings word2vec` (the dimension is the embedding size)."""

    sg: bool = True  # skip-gram (better than CBOW on small corpora such as captions)
    window: int = 5
    negative: int = 5
    epochs: int = 10  # gensim's default is 5; captions are a small corpus
    sample: float = 1e-3  # downsampling of frequent words (gensim's default)


@dataclass
class TrainConfig:
    """`fit`. Saved in each checkpoint as `train_config` (plain values: loadable with weights_only)."""

    store: str = STORE
    out: str = OUT
    epochs: int = 50  # in total: with resume, the epochs already done count
    batch_size: int = 32  # images per batch (each with captions_per_image captions)
    lr: float = 1e-3
    resume: bool = False
    device: str = DEVICE
    seed: int = 0
    min_word_count: int = 5
    captions_per_image: int = 1
    max_len: int = MAX_LEN
    grad_clip: float = 5.0  # 0 disables
    lr_step: int = 0  # StepLR step size in epochs; 0 = constant lr (the report's 100 never fires in 50)
    lr_gamma: float = 0.1
    # linear warm-up: the first N optimizer steps run at lr x (step / N) (0: off). For large batches with a
    # scaled rate (docs/speed.md): Adam's first steps at a high rate can diverge before its moments settle.
    warmup_steps: int = 0
    # the rate over the cross-entropy steps (pipeline/train/step.py rate_factor): constant (the report's), or a
    # half cosine from lr to 0 by the last cross-entropy epoch; applied per step, on top of the warm-up
    lr_schedule: str = "constant"
    amp: bool | None = None  # bf16 autocast; None: on CUDA only (on CPU it is opt-in: not every CPU has bf16)
    compile: bool = False
    resident: str = "auto"  # keep training features on the GPU: auto | yes | no
    decoder: str = "report"  # layer sizes, a name in pipeline.model.DECODER_PRESETS ("tiny" for tests)
    # Show, Attend and Tell options (see pipeline/model.py); attention_penalty is its lambda
    init_from_features: bool = False
    # h0/c0 from the whole feature grid, K numbers per cell (0: zeros, the report's), each image's replaced by
    # zeros with probability init_drop in training (pipeline/model.py DecoderConfig; BENCHMARKS.md, quality)
    init_from_grid: int = 8
    init_drop: float = 0.5
    dropout: float = 0.0
    gate: bool = False
    attention_penalty: float = 0.0
    # how the decoder's input features are normalised, with statistics of the train split's features, kept in
    # the checkpoint (pipeline/model.py DecoderConfig): channel (each channel standardised), rms (all scaled
    # by one number, the default before), none (raw, the report's)
    feature_norm: str = "channel"
    # validation decoding (CIDEr-D) for choosing model.pt; 0 images = choose by validation loss
    val_decode_images: int = 1000
    val_beam_size: int = 1
    # ResNet50's layer4 trained with the decoder, from a layer3 store (None: the encoder stays frozen)
    finetune: str | None = None  # None | "layer4"
    encoder_lr: float = 1e-4  # Adam's rate for layer4 (`lr` is the decoder's)
    finetune_after: int = 0  # epochs of the decoder alone (layer4 frozen) before layer4 trains too
    # word vectors (pipeline/embeddings.py): random | word2vec | the path of a vectors file; frozen or trained
    embeddings: str = "random"
    freeze_embeddings: bool = False
    word2vec: Word2VecConfig = field(default_factory=Word2VecConfig)  # used with embeddings="word2vec"
    # self-critical sequence training (pipeline/scst.py): the epochs after scst_after train on the CIDEr-D of
    # sampled captions (None: never). A schedule option: honoured on --resume (not typed: last.pt's)
    scst_after: int | None = None
    scst_baseline: str = "mean"  # mean (of the image's other samples) | greedy (the greedy caption's reward)
    # the options the user typed (cli.py fills it; a script leaves it empty). With resume, each one that last.pt
    # decides must equal last.pt's value, or fit stops: a typed option is never silently overridden
    typed: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """What checkpoints store as `train_config`: the settings (not `typed`, which belongs to one command)."""
        return {k: v for k, v in asdict(self).items() if k != "typed"}

    @property
    def xe_epochs(self) -> int:
        """The epochs trained on cross-entropy: all of them, or those up to --scst-after."""
        return self.epochs if self.scst_after is None else min(self.epochs, self.scst_after)

    def validate(self) -> None:
        """Values that no training can start from, refused before any work."""
        from pipeline.model import DECODER_PRESETS  # imports torch: here, when fit starts, not for `--help`

        for name, value, low in (
            ("epochs", self.epochs, 1),
            ("batch-size", self.batch_size, 1),
            ("captions-per-image", self.captions_per_image, 1),
            ("min-word-count", self.min_word_count, 1),
            ("val-decode-images", self.val_decode_images, 0),
            ("lr-step", self.lr_step, 0),
            ("warmup-steps", self.warmup_steps, 0),
        ):
            if value < low:
                raise UserError(f"--{name} must be at least {low}")
        for name, value in (
            ("lr", self.lr),
            ("grad-clip", self.grad_clip),
            ("lr-gamma", self.lr_gamma),
            ("dropout", self.dropout),
            ("attention-penalty", self.attention_penalty),
        ):
            if not math.isfinite(value):
                raise UserError(f"--{name} must be a number, not {value}")
        if self.lr <= 0 or self.lr_gamma <= 0:
            raise UserError("--lr and --lr-gamma must be positive")
        if self.grad_clip < 0 or self.attention_penalty < 0 or not 0 <= self.dropout < 1:
            raise UserError("--grad-clip and --attention-penalty must be at least 0, --dropout in [0, 1)")
        if not 0 <= self.init_from_grid <= 2048 or not 0 <= self.init_drop < 1:  # no more numbers than channels
            raise UserError("--init-from-grid must be in [0, 2048], --init-drop in [0, 1)")
        if self.init_from_features and self.init_from_grid:
            raise UserError(
                f"--init-from-features and --init-from-grid {self.init_from_grid} both set the decoder's first "
                "state: add --init-from-grid 0 to start from the mean feature"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule takes {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise UserError(f"--feature-norm takes {', '.join(FEATURE_NORMS)}, not {self.feature_norm!r}")
        if self.decoder not in DECODER_PRESETS:
            raise UserError(f"unknown --decoder {self.decoder!r} (known: {', '.join(DECODER_PRESETS)})")
        if self.finetune is not None and self.finetune not in FINETUNE_LAYERS:
            raise UserError(f"--finetune takes {', '.join(FINETUNE_LAYERS)}, not {self.finetune!r}")
        if self.encoder_lr <= 0:
            raise UserError("--encoder-lr must be positive")
        if self.finetune_after < 0:
            raise UserError("--finetune-after must be at least 0")
        self.check_scst()

    def check_scst(self, records: list[dict] | None = None, epochs_done: int = 0) -> None:
        """SCST settings, and that SCST starts from a model trained with cross-entropy: sampled from an untrained
        decoder, captions score a CIDEr-D of ~0 whatever it does, the advantages are 0 and nothing is learnt.
        `records` (a resumed run's metrics) count the cross-entropy epochs already done."""
        if self.scst_baseline not in SCST_BASELINES:
            raise UserError(f"--scst-baseline takes {', '.join(SCST_BASELINES)}, not {self.scst_baseline!r}")
        if self.scst_after is None or self.scst_after >= self.epochs:
            return
        done = [r for r in records or [] if r.get("phase", "xe") == "xe" and r["epoch"] <= self.scst_after]
        xe_epochs = len(done) + max(0, self.scst_after - epochs_done)
        if self.scst_after < 1 or xe_epochs < 1:
            raise UserError(
                f"--scst-after {self.scst_after} would start self-critical training on a decoder with no "
                "cross-entropy training: its sampled captions score a CIDEr-D of about 0, which gives no signal. "
                "Train with cross-entropy first (--scst-after N, N >= 1, e.g. --epochs 50 --scst-after 30)"
            )


@dataclass
class EvaluateConfig:
    """`evaluate`."""

    model: Path = Path(MODEL)
    store: Path = Path(STORE)
    split: str = EVAL_SPLITS[0]
    beam_size: int = BEAM_SIZE
    out: Path | None = None
    device: str = DEVICE
    meteor: bool | None = None  # None: when Java is there; True: required; False: never (no Java at all)
    batch_size: int = 128


@dataclass
class GenerateConfig:
    """`generate`."""

    images: list[Path] = field(default_factory=list)
    model: Path = Path(MODEL)
    beam_size: int = BEAM_SIZE
    attention: str | Path | None = None  # FILE.png, or a folder (an existing one, or ending in /): one per image
    device: str = DEVICE
    batch_size: int = 16


@dataclass
class DemoConfig:
    """`demo`."""

    out: Path = Path("cache/demo")
    images: int = 960  # 768 train: shape is read from the features at 98% (linear probe) against 85% with 384
    # fit's --captions-per-image 1 (its default): an epoch costs 0.4x one with all 5 captions of every picture
    # (which carry the same picture), so 24 epochs make 4x the optimizer steps of 5 captions x 6 epochs in 1.4x
    # the time; with the report's decoder, shape named in 89.6% of the test pictures instead of 86.5%
    # (BENCHMARKS.md, quality)
    epochs: int = 24
    captions_per_image: int = 1
    size: int = 224
    seed: int = 0
    weights: str | None = None  # None: ImageNet V1 when cached, else none
    # fine-tune layer4 from a layer3 store (fit --finetune layer4), or train on frozen layer4 features
    finetune: bool = False
    encoder_lr: float = TrainConfig.encoder_lr  # fit's, declared there
    finetune_after: int = TrainConfig.finetune_after


@dataclass
class ServeConfig:
    """`serve`."""

    model: Path = Path(MODEL)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = DEVICE
    max_upload_mb: float = 20.0  # MiB per image file
    max_pixels: int = field(default_factory=_pillow_max_pixels)
    max_beam_size: int = 10
    max_batch: int = 8  # queued images captioned in one model call
    decode_threads: int = 2

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
