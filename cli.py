"""Command line: each command parses its options, calls one `pipeline` function and prints what it returns.

Option defaults come from the config dataclasses (pipeline/config.py), declared once there.

Run `uv run cli.py --help`, or `uv run cli.py COMMAND --help` for one command.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from pipeline.config import MAX_BEAM_SIZE, wait_passively
from pipeline.config import DemoConfig as D
from pipeline.config import EvaluateConfig as E
from pipeline.config import ExtractConfig as X
from pipeline.config import GenerateConfig as G
from pipeline.config import ServeConfig as S
from pipeline.config import TrainConfig as T
from pipeline.errors import UserError, describe

wait_passively()  # before any command imports torch

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Image captioning from a cached ResNet50 feature store.",
)


class Dtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Split(str, Enum):
    test = "test"
    val = "val"


class Layer(str, Enum):
    layer4 = "layer4"
    layer3 = "layer3"


class Decode(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class FeatureNorm(str, Enum):
    channel = "channel"
    rms = "rms"
    none = "none"


class LrSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class ScstBaseline(str, Enum):
    mean = "mean"
    greedy = "greedy"


class Finetune(str, Enum):
    layer4 = "layer4"


@app.callback()
def main() -> None:
    """Image captioning from a cached ResNet50 feature store: extract, fit, evaluate, generate, demo."""


def _call(fn: Callable, *args, interrupted: Callable[[], str] = lambda: "interrupted", **kwargs):
    """The one boundary between the library and the user. A UserError becomes one `error:` line on stderr and
    exit 1; so do the failures a user can cause without a bug of ours (memory, the file system). Ctrl-C
    prints `interrupted()` and exits 130; a second Ctrl-C is ignored while the first one cleans up (temp
    files, the lock). No traceback. Generators (generate's captions) are consumed inside this boundary, and
    the library's log lines are printed while it runs (`_terminal_logging`)."""
    previous = _catch_one_sigint()
    try:
        with _terminal_logging():
            result = fn(*args, **kwargs)
    except UserError as e:
        if e.quiet:  # another process of the same torchrun job printed it
            _restore_sigint(previous)
            raise typer.Exit(1) from None
        _fail(str(e), previous)
    except KeyboardInterrupt:
        # Ctrl-C stays ignored until the process has ended: a second one during the interpreter's shutdown
        # would print a traceback (threading._shutdown, atexit handlers).
        print(interrupted(), file=sys.stderr)
        raise typer.Exit(130) from None
    except MemoryError:
        _fail("out of memory: try a smaller --batch-size", previous)
    except OSError as e:  # a file-system error the library did not name (it names those it expects)
        _fail(describe(e), previous)
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch's, on the GPU
            _restore_sigint(previous)
            raise
        _fail(f"out of GPU memory{_oom_detail(e)}: try a smaller --batch-size", previous)
    _restore_sigint(previous)
    return result


@contextlib.contextmanager
def _terminal_logging() -> Iterator[None]:
    """The library's log records printed as today's lines (console.terminal_logging): info and progress from
    rank 0 alone under torchrun, warnings from every rank."""
    launch = _pipeline("distributed", "launched")()
    with _pipeline("console", "terminal_logging")(quiet=launch is not None and launch.rank != 0):
        yield


def _oom_detail(e: BaseException) -> str:
    """What torch's out-of-memory message says in figures, without the rest of it: one long line that ends in
    advice for programmers (PYTORCH_CUDA_ALLOC_CONF, its documentation)."""
    size = r"([\d.]+ [KMGTP]?i?B)"
    asked = re.search(rf"Tried to allocate {size}", str(e))
    total = re.search(rf"total capacity of {size}", str(e))
    parts = ([f"tried to allocate {asked.group(1)}"] if asked else []) + (
        [f"the GPU holds {total.group(1)}"] if total else []
    )
    return f" ({'; '.join(parts)})" if parts else ""


def _fail(message: str, previous_sigint=None) -> NoReturn:
    _restore_sigint(previous_sigint)
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1) from None


def _restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def _catch_one_sigint():
    """Ctrl-C raises KeyboardInterrupt once, then is ignored: for the rest of the process once it came (its
    cleanup and the interpreter's shutdown must not be broken off), until the command returns otherwise.
    Returns the handler to restore (None off the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, handler)


def _pipeline(module: str, name: str) -> Callable:
    """pipeline.MODULE.NAME, imported when it is called: inside `_call`, so that the import (torch's takes
    seconds) stays out of `--help` and a Ctrl-C during it is handled like any other."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"pipeline.{module}"), name)(*args, **kwargs)

    return call


def _command_line(*extra: str) -> str:
    """This command as typed (sys.argv), with `extra` arguments it lacks."""
    argv = list(sys.argv) + [a for a in extra if a not in sys.argv]
    prefix = "uv run " if argv[0].endswith("cli.py") else ""
    return prefix + shlex.join(argv)


def _fit_interrupted(out: Path) -> Callable[[], str]:
    """fit's Ctrl-C message: how to go on, which depends on whether an epoch was saved."""

    def message() -> str:
        if (out / "last.pt").is_file():
            return f"interrupted: the finished epochs are saved in {out / 'last.pt'}; continue with: " + _command_line(
                "--resume"
            )
        return "interrupted before the first epoch was saved: rerun the same command to start again"

    return message


@app.command()
def extract(
    images: Annotated[Path, typer.Option(help="Folder of images (captions file inside it or one folder down).")],
    captions: Annotated[
        Path | None, typer.Option(help="Captions file, when it is not found in --images.")
    ] = X.captions,
    store: Annotated[Path, typer.Option(help="HDF5 feature store to write.")] = X.store,
    weights: Annotated[
        str, typer.Option(help="IMAGENET1K_V1, IMAGENET1K_V2, none (seeded random), or a state_dict file.")
    ] = X.weights,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per ResNet50 batch.")] = X.batch_size,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decoding processes [default: cores-1, 0 on <=2 cores].")
    ] = X.workers,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = X.device,
    dtype: Annotated[Dtype, typer.Option(help="Feature dtype.")] = Dtype(X.dtype),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made differently.")] = X.overwrite,
    layer: Annotated[
        Layer, typer.Option(help="Stage stored: layer4 (7x7x2048) or layer3 (14x14x1024, for fit --finetune layer4).")
    ] = Layer(X.layer),
    decode: Annotated[
        Decode,
        typer.Option(
            help="Where JPEGs are decoded: auto (on the GPU when the device is CUDA), gpu (an error without CUDA) "
            "or cpu (Pillow in the workers). Other images, and JPEGs the GPU cannot decode as Pillow does, always "
            "go through Pillow."
        ),
    ] = Decode(X.decode),
) -> None:
    """Run a frozen ResNet50 once over every captioned image and store its 7x7x2048 features (layer4), or its
    14x14x1024 layer3 features for fine-tuning layer4 (--layer layer3: twice the disk).

    Rerunning the same command resumes an interrupted run; on a complete store it does nothing.
    """

    def run() -> None:
        from pipeline.extract import extract as run_extract

        cfg = X(
            images=images,
            captions=captions,
            store=store,
            weights=weights,
            batch_size=batch_size,
            workers=workers,
            device=device,
            dtype=dtype.value,
            overwrite=overwrite,
            layer=layer.value,
            decode=decode.value,
        )
        _pipeline("console", "print_extract_summary")(run_extract(cfg))

    _call(run, interrupted=lambda: "interrupted: rerun the same command to resume")


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` (on the command line, or in the environment), not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _train_config(ctx: typer.Context) -> T:
    """fit's options as its TrainConfig: each option sets the field of its name (tests/cli/test_cli.py checks that
    they match), a choice as its value, a path as a string; `typed`: the options the user gave, since with
    --resume last.pt decides most of them, and a typed one must agree with it."""
    values = {k: v.value if isinstance(v, Enum) else v for k, v in ctx.params.items()}
    values["store"], values["out"] = str(values["store"]), str(values["out"])
    return T(**values, typed=tuple(sorted(k for k in ctx.params if _typed(ctx, k))))


@app.command()
def fit(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option(help="Feature store made by extract.")] = Path(T.store),
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in total (with --resume, those done count).")] = T.epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = T.batch_size,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = T.lr,
    out: Annotated[Path, typer.Option(help="Folder for model.pt, last.pt, metrics.jsonl, curves.png.")] = Path(T.out),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = T.resume,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = T.device,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, shuffling and caption choice.")] = T.seed,
    min_word_count: Annotated[
        int, typer.Option(min=1, help="Keep words seen this often in train captions.")
    ] = T.min_word_count,
    captions_per_image: Annotated[
        int, typer.Option(min=1, help="Captions of each image per epoch.")
    ] = T.captions_per_image,
    grad_clip: Annotated[float, typer.Option(min=0, help="Clip the gradient norm (0: off).")] = T.grad_clip,
    lr_step: Annotated[int, typer.Option(min=0, help="StepLR step in epochs (0: off; the report: 100).")] = T.lr_step,
    lr_gamma: Annotated[float, typer.Option(help="StepLR factor.")] = T.lr_gamma,
    warmup_steps: Annotated[
        int, typer.Option(min=0, help="Linear lr warm-up over the first N steps (0: off).")
    ] = T.warmup_steps,
    lr_schedule: Annotated[
        LrSchedule, typer.Option(help="Rate over the steps: constant, or a cosine from --lr to 0 by the last epoch.")
    ] = LrSchedule(T.lr_schedule),
    decoder: Annotated[
        str, typer.Option(help="Layer sizes: report (the report's decoder) or tiny (for tests, smoke runs).")
    ] = T.decoder,
    init_from_features: Annotated[bool, typer.Option(help="SAT: h0/c0 from the mean feature.")] = T.init_from_features,
    init_from_grid: Annotated[
        int,
        typer.Option(
            min=0, help="h0/c0 from the whole feature grid, K numbers per cell (0: zeros, the report's decoder)."
        ),
    ] = T.init_from_grid,
    init_drop: Annotated[
        float,
        typer.Option(min=0, max=0.99, help="Training: each image's state from the grid is zeros with this chance."),
    ] = T.init_drop,
    dropout: Annotated[float, typer.Option(min=0, max=0.9, help="SAT: dropout before the output layer.")] = T.dropout,
    gate: Annotated[bool, typer.Option(help="SAT: gating scalar on the attention context.")] = T.gate,
    attention_penalty: Annotated[
        float, typer.Option(min=0, help="SAT: doubly stochastic penalty weight.")
    ] = T.attention_penalty,
    feature_norm: Annotated[
        FeatureNorm,
        typer.Option(
            help="Input features: each channel standardised (channel), all scaled to RMS 1 (rms), or raw (none, "
            "the report's); statistics of the train split, kept in the checkpoint."
        ),
    ] = FeatureNorm(T.feature_norm),
    val_decode_images: Annotated[
        int, typer.Option(min=0, help="Val images decoded for CIDEr-D (0: choose by loss).")
    ] = T.val_decode_images,
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast [default: on CUDA, off on CPU].")
    ] = T.amp,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder.")] = T.compile,
    finetune: Annotated[
        Finetune | None,
        typer.Option(help="Train ResNet50's layer4 with the decoder (needs a store made with extract --layer layer3)."),
    ] = T.finetune,
    encoder_lr: Annotated[float, typer.Option(help="Adam learning rate of layer4 with --finetune.")] = T.encoder_lr,
    finetune_after: Annotated[
        int, typer.Option(min=0, help="With --finetune: epochs of the decoder alone before layer4 trains too.")
    ] = T.finetune_after,
    embeddings: Annotated[
        str, typer.Option(help="Word vectors: random, word2vec (trained on the train captions) or a vectors file.")
    ] = T.embeddings,
    freeze_embeddings: Annotated[
        bool, typer.Option("--freeze-embeddings", help="Keep the word vectors fixed.")
    ] = T.freeze_embeddings,
    scst_after: Annotated[
        int | None,
        typer.Option(
            help="Self-critical training (CIDEr-D rewards) in the epochs after N; N >= 1 cross-entropy epochs "
            "first. With --resume: last.pt's when not given."
        ),
    ] = T.scst_after,
    scst_baseline: Annotated[
        ScstBaseline,
        typer.Option(help="SCST baseline: mean reward of the image's other samples, or the greedy caption's."),
    ] = ScstBaseline(T.scst_baseline),
) -> None:
    """Train the attention-LSTM decoder from the feature store (the ResNet50 is not run again; from a layer3
    store, its layer4 runs on each batch, and trains with the decoder with --finetune layer4).

    Writes OUT/model.pt (best by validation CIDEr-D), OUT/last.pt (for --resume), OUT/metrics.jsonl and
    OUT/curves.png.
    """
    cfg = _train_config(ctx)
    _call(_pipeline("train", "fit"), cfg, interrupted=_fit_interrupted(out))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint to evaluate.")] = E.model,
    store: Annotated[Path, typer.Option(help="Feature store with the split's features and captions.")] = E.store,
    split: Annotated[Split, typer.Option(help="Split to score.")] = Split(E.split),
    beam_size: Annotated[int, typer.Option(min=1, max=MAX_BEAM_SIZE, help="Beam width (1: greedy).")] = E.beam_size,
    out: Annotated[Path | None, typer.Option(help="Write metrics and captions to this JSON file.")] = E.out,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = E.device,
    meteor: Annotated[
        bool | None, typer.Option("--meteor/--no-meteor", help="Require METEOR (needs Java) / skip Java.")
    ] = E.meteor,
) -> None:
    """Caption every image of a split once and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (coco-caption)."""
    cfg = E(model=model, store=store, split=split.value, beam_size=beam_size, out=out, device=device, meteor=meteor)

    def run() -> None:
        _pipeline("console", "print_scores")(_pipeline("evaluate", "evaluate")(cfg))
        if out is not None:
            print(f"wrote {out}")

    _call(run, interrupted=lambda: "interrupted: nothing was written")


@app.command()
def generate(
    image: Annotated[list[Path], typer.Option(help="A photo or a folder of photos; repeat for more.")],
    model: Annotated[Path, typer.Option(help="Checkpoint to caption with.")] = G.model,
    beam_size: Annotated[int, typer.Option(min=1, max=MAX_BEAM_SIZE, help="Beam width (1: greedy).")] = G.beam_size,
    attention: Annotated[
        str | None, typer.Option(help="Attention figure: FILE.png, or a folder (ending in /) for one per image.")
    ] = G.attention,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = G.device,
) -> None:
    """Caption photos with a trained model (loads the models once for all images)."""
    cfg = G(images=list(image), model=model, beam_size=beam_size, attention=attention, device=device)

    def run() -> None:
        caption_line = _pipeline("console", "caption_line")
        for item in _pipeline("generate", "generate")(cfg):  # each line as soon as its caption is made
            print(caption_line(item, json), flush=True)

    _call(run)
    global _skip_teardown
    _skip_teardown = True


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's images, store, model and figures.")] = D.out,
    images: Annotated[int, typer.Option(min=20, help="Generated images.")] = D.images,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = D.epochs,
    finetune: Annotated[
        bool,
        typer.Option(
            "--finetune/--frozen",
            help="Fine-tune ResNet50's layer4 from a layer3 store (fit --finetune layer4), or train on frozen "
            "layer4 features.",
        ),
    ] = D.finetune,
) -> None:
    """The whole pipeline on a generated sample: CPU, no downloads, a few minutes."""
    again = "interrupted: rerun the same command to start the demo again"
    cfg = D(out=out, images=images, epochs=epochs, finetune=finetune)
    _call(_pipeline("demo", "demo"), cfg, interrupted=lambda: again)


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="Checkpoint to caption with.")] = S.model,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every network interface).")] = S.host,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = S.port,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = S.device,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest photo file accepted, in MB.")
    ] = S.max_upload_mb,
) -> None:
    """A web page and JSON API: drop a photo, see its caption, the attention of each word and the n-best beams.

    Loads the models once; serves http://HOST:PORT/ and POST /api/caption, GET /api/health, GET /api/model.
    """
    from pipeline.serve import serve as run_serve

    cfg = S(model=model, host=host, port=port, device=device, max_upload_mb=max_upload_mb)
    _call(run_serve, cfg)


_skip_teardown = False  # set by a command that succeeded and may end without the interpreter's teardown


def _end_without_teardown() -> None:
    """End the process now, as the interpreter would, less its teardown of torch's and torchvision's modules:
    0.4 s for torch alone, 0.9 s with torchvision (measured on 2 cores), a quarter of a one-photo `generate`
    from start to exit. What the teardown would do that matters still happens: the output streams are
    flushed and the atexit functions run (logging's, temporary files'). Returns, for Python's own shutdown,
    when a thread is still running or a stream cannot be flushed (a closed pipe: Python reports it)."""
    if threading.active_count() > 1:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return
    atexit._run_exitfuncs()  # what Python's shutdown runs first (the function the interpreter itself calls)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        os._exit(120)  # Python's exit status when it cannot flush at exit
    os._exit(0)


if __name__ == "__main__":
    try:
        app()
    except SystemExit as e:
        if _skip_teardown and not e.code:
            _end_without_teardown()
        raise
