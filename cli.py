"""Command line: each command parses its options and calls one `pipeline` function.

Run `uv run cli.py --help`, or `uv run cli.py COMMAND --help` for one command.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import UserError

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


@app.callback()
def main() -> None:
    """Image captioning from a cached ResNet50 feature store: extract, fit, evaluate, generate, demo."""


def _run(fn, *args, **kwargs):
    """Call a pipeline function; a UserError becomes one `error:` line and exit 1, Ctrl-C exit 130."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(130) from None


@app.command()
def extract(
    images: Annotated[Path, typer.Option(help="Folder of images (captions file inside it or one folder down).")],
    captions: Annotated[Path | None, typer.Option(help="Captions file, when it is not found in --images.")] = None,
    store: Annotated[Path, typer.Option(help="HDF5 feature store to write.")] = Path("cache/features.h5"),
    weights: Annotated[
        str, typer.Option(help="IMAGENET1K_V1, IMAGENET1K_V2, none (seeded random), or a state_dict file.")
    ] = "IMAGENET1K_V1",  # noqa: E501
    batch_size: Annotated[int, typer.Option(min=1, help="Images per ResNet50 batch.")] = 64,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decoding processes [default: cores-1, 0 on <=2 cores].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    dtype: Annotated[Dtype, typer.Option(help="Feature dtype.")] = Dtype.float16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made differently.")] = False,
) -> None:
    """Run a frozen ResNet50 once over every captioned image and store its 7x7x2048 features.

    Rerunning the same command resumes an interrupted run; on a complete store it does nothing.
    """
    from pipeline.extract import ExtractConfig
    from pipeline.extract import extract as run_extract

    cfg = ExtractConfig(
        images=images,
        captions=captions,
        store=store,
        weights=weights,
        batch_size=batch_size,
        workers=workers,
        device=device,
        dtype=dtype.value,
        overwrite=overwrite,
    )
    _run(run_extract, cfg)


@app.command()
def fit(
    store: Annotated[Path, typer.Option(help="Feature store made by extract.")] = Path("cache/features.h5"),
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in total (with --resume, those done count).")] = 50,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    out: Annotated[Path, typer.Option(help="Folder for model.pt, last.pt and metrics.jsonl.")] = Path("cache"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for initialisation, shuffling and caption choice.")] = 0,
    min_word_count: Annotated[int, typer.Option(min=1, help="Keep words seen this often in train captions.")] = 5,
    captions_per_image: Annotated[int, typer.Option(min=1, help="Captions of each image per epoch.")] = 1,
    grad_clip: Annotated[float, typer.Option(min=0, help="Clip the gradient norm (0: off).")] = 5.0,
    lr_step: Annotated[int, typer.Option(min=0, help="StepLR step in epochs (0: off; the report: 100).")] = 0,
    lr_gamma: Annotated[float, typer.Option(help="StepLR factor.")] = 0.1,
    init_from_features: Annotated[bool, typer.Option(help="SAT: h0/c0 from the mean feature.")] = False,
    dropout: Annotated[float, typer.Option(min=0, max=0.9, help="SAT: dropout before the output layer.")] = 0.0,
    gate: Annotated[bool, typer.Option(help="SAT: gating scalar on the attention context.")] = False,
    attention_penalty: Annotated[float, typer.Option(min=0, help="SAT: doubly stochastic penalty weight.")] = 0.0,
    val_decode_images: Annotated[
        int, typer.Option(min=0, help="Val images decoded for CIDEr-D (0: choose by loss).")
    ] = 1000,  # noqa: E501
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast [default: on CUDA, off on CPU].")
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder.")] = False,
) -> None:
    """Train the attention-LSTM decoder from the feature store (the ResNet50 is not run again).

    Writes OUT/model.pt (best by validation CIDEr-D), OUT/last.pt (for --resume) and OUT/metrics.jsonl.
    """
    from pipeline.train import TrainConfig
    from pipeline.train import fit as run_fit

    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        resume=resume,
        device=device,
        seed=seed,
        min_word_count=min_word_count,
        captions_per_image=captions_per_image,
        grad_clip=grad_clip,
        lr_step=lr_step,
        lr_gamma=lr_gamma,
        init_from_features=init_from_features,
        dropout=dropout,
        gate=gate,
        attention_penalty=attention_penalty,
        val_decode_images=val_decode_images,
        amp=amp,
        compile=compile,
    )
    _run(run_fit, cfg)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Checkpoint to evaluate.")] = Path("cache/model.pt"),
    store: Annotated[Path, typer.Option(help="Feature store with the split's features and captions.")] = Path(
        "cache/features.h5"
    ),
    split: Annotated[Split, typer.Option(help="Split to score.")] = Split.test,
    beam_size: Annotated[int, typer.Option(min=1, help="Beam width (1: greedy).")] = 3,
    out: Annotated[Path | None, typer.Option(help="Write metrics and captions to this JSON file.")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    meteor: Annotated[
        bool | None, typer.Option("--meteor/--no-meteor", help="Require METEOR (needs Java) / skip Java.")
    ] = None,
) -> None:
    """Caption every image of a split once and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (coco-caption)."""
    from pipeline.evaluate import EvaluateConfig
    from pipeline.evaluate import evaluate as run_evaluate

    cfg = EvaluateConfig(
        model=model, store=store, split=split.value, beam_size=beam_size, out=out, device=device, meteor=meteor
    )
    _run(run_evaluate, cfg)


@app.command()
def generate(
    image: Annotated[list[Path], typer.Option(help="A photo or a folder of photos; repeat for more.")],
    model: Annotated[Path, typer.Option(help="Checkpoint to caption with.")] = Path("cache/model.pt"),
    beam_size: Annotated[int, typer.Option(min=1, help="Beam width (1: greedy).")] = 3,
    attention: Annotated[Path | None, typer.Option(help="Write an attention figure (PNG) per image.")] = None,
    json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
) -> None:
    """Caption photos with a trained model (loads the models once for all images)."""
    from pipeline.generate import GenerateConfig
    from pipeline.generate import generate as run_generate

    cfg = GenerateConfig(
        images=list(image), model=model, beam_size=beam_size, attention=attention, json=json, device=device
    )
    _run(run_generate, cfg)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's images, store, model and figure.")] = Path(
        "cache/demo"
    ),
    images: Annotated[int, typer.Option(min=20, help="Generated images.")] = 480,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 12,
) -> None:
    """The whole pipeline on a generated sample: CPU, no downloads, a few minutes."""
    from pipeline.demo import DemoConfig
    from pipeline.demo import demo as run_demo

    _run(run_demo, DemoConfig(out=out, images=images, epochs=epochs))


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="Checkpoint to caption with.")] = Path("cache/model.pt"),
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every network interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest photo file accepted, in MB.")] = 20.0,
) -> None:
    """A web page and JSON API: drop a photo, see its caption, the attention of each word and the n-best beams.

    Loads the models once; serves http://HOST:PORT/ and POST /api/caption, GET /api/health, GET /api/model.
    """
    from pipeline.serve import ServeConfig
    from pipeline.serve import serve as run_serve

    cfg = ServeConfig(model=model, host=host, port=port, device=device, max_upload_mb=max_upload_mb)
    _run(run_serve, cfg)


if __name__ == "__main__":
    app()
