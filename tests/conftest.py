"""Shared fixtures: tiny synthetic image sets, a seeded ResNet50 state_dict file, CLI runners.

Real caption files are read from ../shared/data (next to the repository), never copied into it;
tests that need them skip when that folder is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project is not installed (uv `package = false`): import it from the checkout
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS_SEED = 1234  # differs from pipeline.encoder.RANDOM_SEED, so a file's weights differ from `--weights none`


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"needs the real data of ../shared/data, which is not next to this checkout (a fresh clone has "
            f"none): {path} is absent"
        )
    return path


def _pixels(i: int, size: tuple[int, int]) -> np.ndarray:
    """A distinct, structured RGB picture for index i: its own colour, gradient direction and noise."""
    w, h = size
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2  # 0..1
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    img = colour * (0.4 + 0.6 * ramp[..., None]) + rng.normal(0, 25, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (64, 48), start: int = 0) -> list[Path]:
    """Write small synthetic images (JPEG, or PNG for `.png` names), each different; returns their paths."""
    folder = Path(folder)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_pixels(start + i, size))
        if path.suffix.lower() == ".png":
            img.save(path, format="PNG")
        else:
            img.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def write_token_file(folder: Path, names: list[str], per_image: int = 5) -> Path:
    """A Flickr8k `Flickr8k.token.txt` with `per_image` captions for each name."""
    lines = [f"{name}#{k}\tcaption {k} of picture {name} .\n" for name in names for k in range(per_image)]
    path = Path(folder) / "Flickr8k.token.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def make_images():
    """`make_images(folder, names, size=(64, 48))`: write tiny synthetic JPEG/PNG files."""
    return write_images


@pytest.fixture(scope="session")
def make_flickr8k():
    """`make_flickr8k(folder, n)`: a Flickr8k-token dataset folder of n tiny images, 5 captions each."""

    def make(folder: Path, n: int = 6, size: tuple[int, int] = (64, 48)) -> Path:
        names = [f"{1000 + i}_img.jpg" for i in range(n)]
        write_images(folder, names, size)
        write_token_file(folder, names)
        return Path(folder)

    return make


@pytest.fixture
def flickr8k_dir(tmp_path, make_flickr8k) -> Path:
    """A tiny Flickr8k-token dataset: 3 JPEGs and Flickr8k.token.txt with 5 captions each."""
    return make_flickr8k(tmp_path / "flickr8k", 3)


@pytest.fixture(scope="session")
def resnet50_weights_file(tmp_path_factory) -> Path:
    """A ResNet50 state_dict file (seeded random init), as a user would pass with `--weights FILE`."""
    import torch
    from torchvision.models import resnet50

    torch.manual_seed(WEIGHTS_SEED)
    model = resnet50(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet50_seeded.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cli():
    """Run `cli.py` in-process with typer's CliRunner: `cli("extract", "--images", ..., code=0)`.
    Asserts the exit code (showing the output when it differs) and returns the result."""
    from typer.testing import CliRunner

    from cli import app

    def run(*args: str | Path, code: int = 0):
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exit_code != code:
            detail = ""
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                import traceback

                detail = "".join(traceback.format_exception(result.exception))
            pytest.fail(
                f"exit {result.exit_code}, expected {code}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{detail}"
            )
        return result

    return run


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `python cli.py` subprocesses. Where bytecode may not be written (PYTHONDONTWRITEBYTECODE)
    and torch has none installed, each fresh process compiles torch's sources again (~10 s of CPU): a private
    bytecode cache, shared by this session's subprocesses, pays that once. Nothing is written to the checkout."""
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if env.get("PYTHONDONTWRITEBYTECODE") and not os.path.exists(torch.__cached__ or ""):
        del env["PYTHONDONTWRITEBYTECODE"]
        env["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return env


@pytest.fixture(scope="session")
def cli_subprocess(subprocess_env):
    """`cli_subprocess(*args)`: run `python cli.py ARGS` in a fresh process from the repository root, as a
    user would; returns the CompletedProcess (text stdout/stderr)."""

    def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "cli.py", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=subprocess_env,
        )

    return run


@pytest.fixture(scope="session")
def real_data():
    """`real_data("flickr8k", "Flickr8k.token.txt")`: a path under ../shared/data, or skip the test."""
    return shared_data


# The safety tests' fixtures `store`, `trained` and `photos` (tests/helpers_safety.py), shared by
# tests/train/test_fit_safety.py and tests/cli/test_evaluate_generate_safety.py. Module-scoped ones are built once
# per module that asks; a module's own fixture of the same name (test_fit.py's `store`) takes precedence.
from helpers_safety import photos, store, trained  # noqa: E402, F401
