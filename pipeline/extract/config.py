"""extract's settings (`ExtractConfig`, declared in pipeline/config.py with every command's), the provenance it
records in the store, and the type of the encoder it runs."""

from __future__ import annotations

import json
from collections.abc import Callable

import h5py
import PIL
import torch
import torchvision

from pipeline.config import DECODE_MODES, ExtractConfig
from pipeline.encoder import ENCODER_NAMES, WeightsInfo
from pipeline.store import FORMAT_VERSION
from pipeline.transform import TransformConfig

# (weights spec, layer) -> (trunk, its weights' provenance): pipeline.encoder.build_encoder, or a stand-in
EncoderFactory = Callable[[str, str], tuple[torch.nn.Module, WeightsInfo]]


def provenance(
    weights: dict, transform: TransformConfig, dtype: str, layer: str = "layer4", jpeg_decoder: str = "pillow"
) -> dict:
    """The store's attributes that say how its features were made (compared on resume, but `jpeg_decoder` and
    the library versions: what decoded the plain JPEGs of the run that made the store, pillow or nvjpeg+pillow;
    their features agree within the tolerance docs/speed.md gives)."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": ENCODER_NAMES[layer],
        "layer": layer,
        **weights,
        "transform": json.dumps(transform.to_dict(), sort_keys=True),
        "dtype": dtype,
        "jpeg_decoder": jpeg_decoder,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "pillow_version": PIL.__version__,
    }


__all__ = ["DECODE_MODES", "EncoderFactory", "ExtractConfig", "provenance"]
