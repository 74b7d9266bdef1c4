"""ResNet50 for the store: the frozen trunk up to the stored stage, layer4 as a trainable head, and how their
weights are chosen.

One torchvision resnet50, built from one `--weights` spec, is the source of both parts:

    stem .. layer3   (B, 3, 224, 224) -> (B, 1024, 14, 14)   frozen, eval mode: what a layer3 store holds
    layer4           (B, 1024, 14, 14) -> (B, 2048, 7, 7)    what a layer4 store holds, or the head that
                                                             fit trains from a layer3 store (`--finetune`)

The head's BatchNorm layers are FrozenBatchNorm2d: statistics and affine parameters fixed (the detectron2 /
torchvision detection practice for small batches), so that its trained parameters are the convolutions'
weights (14.9M). Stores hold the output channels-last: (7, 7, 2048) or (14, 14, 1024).
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError, describe
from pipeline.files import read_torch

# The stage a store holds -> its rows' shape (channels-last) and the `encoder` provenance it records.
FEATURE_SHAPES = {"layer4": (7, 7, 2048), "layer3": (14, 14, 1024)}
LAYERS = tuple(FEATURE_SHAPES)
ENCODER_NAMES = {
    "layer4": "torchvision.resnet50 trunk (children[:-2]), output 7x7x2048 channels-last",
    "layer3": "torchvision.resnet50 stem to layer3 (children[:-3]), output 14x14x1024 channels-last",
}
ENCODER_NAME = ENCODER_NAMES["layer4"]  # stores made before layers had a name hold this one
FEATURE_SHAPE = FEATURE_SHAPES["layer4"]  # what the decoder reads
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
            state = read_torch(cached, f"the cached {spec} weights", "a torchvision weights file")
        except UserError as e:  # a damaged cache file
            raise UserError(f"{e}; delete that file to download it again") from None
        return state, WeightsInfo(spec, _sha256(cached), str(cached))
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"--weights {spec!r} is neither {', '.join(NAMED_WEIGHTS)}, 'none', nor an existing state_dict file"
        )
    state = read_torch(path, "weights file", "a ResNet50 state_dict file (--weights FILE)")
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return _trunk_state(state), WeightsInfo("file", _sha256(path), str(path.resolve()))


def build_resnet50(spec: str) -> tuple[nn.Module, WeightsInfo]:
    """The whole torchvision resnet50 with the weights of `spec` (seeded when `none`), eval mode, on CPU."""
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
    return model.eval(), info


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def build_encoder(spec: str, layer: str = "layer4") -> tuple[nn.Module, WeightsInfo]:
    """The frozen trunk that extract runs, up to `layer` (layer4: everything before avgpool/fc; layer3: one
    stage less), in eval mode, on CPU, with its weights' provenance."""
    if layer not in FEATURE_SHAPES:
        raise UserError(f"unknown --layer {layer!r} (known: {', '.join(LAYERS)})")
    model, info = build_resnet50(spec)
    return trunk_of(model, layer), info


def trunk_of(model: nn.Module, layer: str) -> nn.Module:
    """A resnet50's children up to `layer` (layer4: all but avgpool and fc; layer3: one stage less), frozen."""
    drop = 2 if layer == "layer4" else 3
    return _frozen(nn.Sequential(*list(model.children())[:-drop]))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with its statistics and affine parameters fixed (buffers, not parameters): what it computes
    in eval mode, in train mode too. The state_dict of torchvision's FrozenBatchNorm2d (a BatchNorm2d's
    without num_batches_tracked). Its forward is the native batch_norm kernel in inference form, which gives
    BatchNorm2d's eval output bit for bit; torchvision's `x * scale + shift` took 3x as long forward and 1.6x
    forward and backward (channels-last (32, 512, 14, 14), CPU)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d's counter: meaningless when frozen
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def layer4_head() -> nn.Module:
    """ResNet50's layer4 as torchvision builds it (three Bottlenecks, the first with the stride-2 downsample),
    with FrozenBatchNorm2d, untrained: the architecture that a checkpoint's fine-tuned weights load into."""
    from torchvision.models.resnet import Bottleneck, conv1x1

    with torch.random.fork_rng(devices=[]):  # its throwaway init must not move the caller's RNG
        downsample = nn.Sequential(conv1x1(1024, 2048, stride=2), FrozenBatchNorm2d(2048))
        blocks = [Bottleneck(1024, 512, 2, downsample, norm_layer=FrozenBatchNorm2d)]
        blocks += [Bottleneck(2048, 512, norm_layer=FrozenBatchNorm2d) for _ in range(2)]
    return nn.Sequential(*blocks)


def split_resnet50(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(stem to layer3, frozen; layer4 as a head with frozen BatchNorm, convolutions trainable) of one model."""
    trunk = trunk_of(model, "layer3")
    head = layer4_head()
    head.load_state_dict(model.layer4.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
    return trunk, head


def build_layer4(spec: str) -> tuple[nn.Module, WeightsInfo]:
    """ResNet50's layer4 from `spec`, as the head fit trains (`--finetune layer4`) or runs frozen on a layer3
    store. `none` gives the layer4 of the same seeded model as build_encoder("none")."""
    model, info = build_resnet50(spec)
    _, head = split_resnet50(model)
    return head, info


def recorded_weights(identity: dict) -> str:
    """The `--weights` value that rebuilds the encoder a store (or a checkpoint's store) was made with."""
    name = identity.get("weights", "")
    if name in ("none", *NAMED_WEIGHTS):
        return name
    path = identity.get("weights_path", "")
    if not path or not Path(path).is_file():
        raise UserError(
            f"the encoder weights file the features were made with is not at {path or '(unrecorded)'} any more; "
            "put it back there to use it again"
        )
    return path


def build_recorded(identity: dict) -> tuple[nn.Module, WeightsInfo]:
    """The whole resnet50 with the weights a store recorded, checked against the recorded sha256."""
    model, info = build_resnet50(recorded_weights(identity))
    if not info.same_weights(WeightsInfo(identity.get("weights", ""), identity.get("weights_sha256", ""))):
        raise UserError(
            f"the encoder weights at hand ({info.path or info.name}) differ from those the features were made with "
            f"(sha256 {identity.get('weights_sha256', '')[:12]}...)"
        )
    return model, info


def encode(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) normalised images -> (B, 7, 7, 2048) or (B, 14, 14, 1024) features, channels-last."""
    return trunk(images).permute(0, 2, 3, 1)
