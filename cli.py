"""Command line: each command parses its options and calls one `pipeline` function.

Run `uv run cli.py --help`, or `uv run cli.py COMMAND --help` for one command.
"""

from __future__ import annotations

import sys
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
    workers: Annotated[int | None, typer.Option(min=0, help="Decoding worker processes [default: cores - 1].")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Feature dtype: float16 or float32.")] = "float16",
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
        dtype=dtype,
        overwrite=overwrite,
    )
    _run(run_extract, cfg)


if __name__ == "__main__":
    app()
