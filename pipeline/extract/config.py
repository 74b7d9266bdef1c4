"""extract's settings, the provenance it records in the store, and the type of the encoder it runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import PIL
import torch
import torchvision

from pipeline.encoder import ENCODER_NAMES, WeightsInfo
from pipeline.store import FORMAT_VERSION
from pipeline.transform import TransformConfig

# (weights spec, layer) -> (trunk, its weights' provenance): pipeline.encoder.build_encoder, or a stand-in
EncoderFactory = Callable[[str, str], tuple[torch.nn.Module, WeightsInfo]]


@dataclass
class ExtractConfig:
    images: Path
    captions: Path | None = None
    store: Path = Path("cache/features.h5")
    weights: str = "IMAGENET1K_V1"
    batch_size: int = 64
    workers: int | None = None  # None: runtime.default_workers()
    device: str = "auto"
    dtype: str = "float16"
    overwrite: bool = False
    layer: str = "layer4"  # the ResNet50 stage stored: layer4 (7x7x2048) or layer3 (14x14x1024)
    transform: TransformConfig = field(default_factory=TransformConfig)


def provenance(weights: dict, transform: TransformConfig, dtype: str, layer: str = "layer4") -> dict:
    """The store's attributes that say how its features were made (compared on resume)."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": ENCODER_NAMES[layer],
        "layer": layer,
        **weights,
        "transform": json.dumps(transform.to_dict(), sort_keys=True),
        "dtype": dtype,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "pillow_version": PIL.__version__,
    }
