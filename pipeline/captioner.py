"""A trained captioner for new photos: the checkpoint's model plus the encoder its training store was made with.

For a model trained on a layer4 store, the ResNet50 trunk up to layer4 makes the features. For one trained on
a layer3 store, the trunk runs from the stem to layer3, the features are rounded to the store's dtype (as the
stored ones were), and layer4 follows: the checkpoint's fine-tuned one, or the frozen one of the recorded
weights. Both ResNet50 parts come from the same weights, checked against the recorded sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import BEAM_SIZE
from pipeline.decode import Decoded, beam_search
from pipeline.encoder import build_recorded, encode, recorded_weights, trunk_of
from pipeline.errors import UserError, describe
from pipeline.model import CaptionModel, Decoder
from pipeline.store import DTYPES, layer_of
from pipeline.transform import TransformConfig, normalize
from pipeline.vocab import Vocabulary


def encoder_spec(store_identity: dict) -> str:
    """The `--weights` value that rebuilds the encoder a checkpoint's store was made with."""
    return recorded_weights(store_identity)


@dataclass
class Captioner:
    model: CaptionModel  # the decoder, and layer4 when the features are layer3's
    vocab: Vocabulary
    encoder: torch.nn.Module  # the frozen trunk, up to the stage the training store held
    transform: TransformConfig
    feature_dtype: np.dtype
    device: torch.device
    max_steps: int
    # What the checkpoint says about itself (no tensors): epoch, best, metrics, configs, store provenance.
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model, Decoder):  # a bare decoder: a model trained on a layer4 store
            self.model = CaptionModel(self.model).eval()
        self.model.decoder.for_inference()  # its weights stay as loaded: decoding keeps its step weights

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder

    @classmethod
    def load(cls, model_path: str | Path, device: torch.device) -> Captioner:
        ckpt = checkpoint.load(model_path)
        ident = ckpt["store"]
        try:
            transform = TransformConfig.from_dict(json.loads(ident["transform"]))
            dtype = np.dtype(DTYPES[ident["dtype"]])
        except (ValueError, TypeError, KeyError) as e:  # JSON, fields or dtype of another tool's file
            problem = f"unreadable store provenance ({describe(e)})"
            raise UserError(f"{model_path} is not a valid checkpoint: {problem}") from None
        layer = layer_of(ident)
        resnet, _ = build_recorded(ident)
        trunk = trunk_of(resnet, layer)
        model, vocab = checkpoint.build_model(ckpt, model_path, layer, resnet)
        return cls(
            model.to(device),
            vocab,
            trunk.to(device, memory_format=torch.channels_last),
            transform,
            dtype,
            device,
            checkpoint.max_steps(ckpt),
            {k: ckpt[k] for k in ("epoch", "best", "metrics", "model_config", "train_config", "store") if k in ckpt},
        )

    @torch.inference_mode()
    def caption(self, pixels: torch.Tensor, beam_size: int = BEAM_SIZE, n_best: int = 0) -> list[Decoded]:
        """(B, 3, H, W) uint8 -> decoded captions. Features are rounded to the store's dtype at the stage the
        store held, as in training, then go through the model's layer4 when it has one. n_best > 0 also fills
        each result's `beams` (see decode.beam_search)."""
        x = normalize(pixels.to(self.device), self.transform).contiguous(memory_format=torch.channels_last)
        feats = encode(self.encoder, x)
        feats = feats.to(torch.from_numpy(np.zeros(0, self.feature_dtype)).dtype)
        return beam_search(self.model.decoder, self.model.encode(feats), beam_size, self.max_steps, n_best)

    def warm_up(self, beam_size: int = BEAM_SIZE) -> None:
        """Caption a grey picture twice, so that the first photo costs what later ones cost: the first call of
        each kernel, and the decoder's word table, which the second decode with the same weights makes
        (`Decoder.for_inference`; 60 ms on 2 CPU cores at V = 7,456). serve runs it before its first request."""
        size = self.transform.size
        grey = torch.full((1, 3, size, size), 128, dtype=torch.uint8)
        for _ in range(2):
            self.caption(grey, beam_size)

    def words(self, decoded: Decoded) -> list[str]:
        return [self.vocab.itos[t] for t in decoded.tokens]
