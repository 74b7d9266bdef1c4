"""The frozen ResNet50 trunk (everything before avgpool/fc) and how its weights are chosen."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError, describe

ENCODER_NAME = "torchvision.resnet50 trunk (children[:-2]), output 7x7x2048 channels-last"
FEATURE_SHAPE = (7, 7, 2048)
NAMED_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")
RANDOM_SEED = 0  # `--weights none` is seeded so that two runs give the same features


@dataclass(frozen=True)
class WeightsInfo:
    """What a store or checkpoint records about the encoder weights."""

    name: str  # IMAGENET1K_V1 | IMAGENET1K_V2 | none | file
    sha256: str  # of the state_dict file (files and downloaded ImageNet weights); "" for none
    path: str = ""  # the file given by the user, for error messages

    def to_dict(self) -> dict:
        return {"weights": self.name, "weights_sha256": self.sha256, "weights_path": self.path}

    def same_weights(self, other: WeightsInfo) -> bool:
        return self.name == other.name and self.sha256 == other.sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trunk_state(state: dict) -> dict:
    """Accept a bare ResNet50 state_dict or one wrapped as {'state_dict': ...} / prefixed 'module.'."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def imagenet_weights_file(name: str) -> Path:
    """Where torchvision caches the named ImageNet weights (`IMAGENET1K_V1`...): the file may not exist yet."""
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


_imagenet_file = imagenet_weights_file  # the old private name, still imported by pipeline/demo.py


def load_weights(spec: str) -> tuple[dict | None, WeightsInfo]:
    """Resolve `--weights`: a torchvision name, `none`, or a state_dict file. Downloads only a named
    ImageNet set that is not cached yet, and turns a failed download into a UserError."""
    if spec.lower() == "none":
        return None, WeightsInfo("none", "")
    if spec in NAMED_WEIGHTS:
        cached = imagenet_weights_file(spec)
        if not cached.is_file():
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)
            try:
                from torchvision.models import ResNet50_Weights

                ResNet50_Weights[spec].get_state_dict(progress=True)
            except Exception as e:  # urllib, ssl, socket, hash-check errors all mean "not available"
                raise UserError(
                    f"could not download ResNet50 {spec} weights ({describe(e)}); "
                    "pass --weights FILE with a ResNet50 state_dict, or --weights none"
                ) from None
            finally:
                socket.setdefaulttimeout(old)
        try:
            state = torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache file: zip, pickle or I/O errors
            raise UserError(
                f"cannot load the cached {spec} weights {cached} ({describe(e)}); delete that file to download it again"
            ) from None
        return state, WeightsInfo(spec, _sha256(cached), str(cached))
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"--weights {spec!r} is neither {', '.join(NAMED_WEIGHTS)}, 'none', nor an existing state_dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors: the file is not a plain state_dict
        raise UserError(f"cannot load weights file {path}: {describe(e)}") from None
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return _trunk_state(state), WeightsInfo("file", _sha256(path), str(path.resolve()))


def build_encoder(spec: str) -> tuple[nn.Module, WeightsInfo]:
    """The frozen ResNet50 trunk in eval mode, on CPU, with its weights' provenance."""
    from torchvision.models import resnet50  # imported here: torchvision's import alone takes seconds

    state, info = load_weights(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = resnet50(weights=None)
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False (e.g. a ResNet18 file)
            first = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"weights {info.path or info.name} are not a ResNet50 state_dict ({first})") from None
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise UserError(
                f"weights {info.path or info.name} are not a ResNet50 state_dict "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]})"
            )
    trunk = nn.Sequential(*list(model.children())[:-2])
    trunk.eval()
    trunk.requires_grad_(False)
    return trunk, info


def encode(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) normalised images -> (B, 7, 7, 2048) features, channels-last."""
    return trunk(images).permute(0, 2, 3, 1)
