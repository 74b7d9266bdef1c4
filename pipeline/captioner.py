"""A trained captioner for new photos: the checkpoint's decoder plus the encoder it was trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.decode import Decoded, beam_search
from pipeline.encoder import WeightsInfo, build_encoder, encode
from pipeline.errors import UserError, describe
from pipeline.model import Decoder
from pipeline.store import DTYPES
from pipeline.transform import TransformConfig, normalize
from pipeline.vocab import Vocabulary


def encoder_spec(store_identity: dict) -> str:
    """The `--weights` value that rebuilds the encoder a checkpoint's store was made with."""
    name = store_identity.get("weights", "")
    if name in ("none", "IMAGENET1K_V1", "IMAGENET1K_V2"):
        return name
    path = store_identity.get("weights_path", "")
    if not path or not Path(path).is_file():
        raise UserError(
            f"the encoder weights file the features were made with is not at {path or '(unrecorded)'} any more; "
            "put it back there to caption new photos with this model"
        )
    return path


@dataclass
class Captioner:
    decoder: Decoder
    vocab: Vocabulary
    encoder: torch.nn.Module
    transform: TransformConfig
    feature_dtype: np.dtype
    device: torch.device
    max_steps: int

    @classmethod
    def load(cls, model_path: str | Path, device: torch.device) -> Captioner:
        ckpt = checkpoint.load(model_path)
        decoder, vocab = checkpoint.build_decoder(ckpt, model_path)
        ident = ckpt["store"]
        try:
            transform = TransformConfig.from_dict(json.loads(ident["transform"]))
            dtype = np.dtype(DTYPES[ident["dtype"]])
        except (ValueError, TypeError, KeyError) as e:  # JSON, fields or dtype of another tool's file
            problem = f"unreadable store provenance ({describe(e)})"
            raise UserError(f"{model_path} is not a valid checkpoint: {problem}") from None
        trunk, info = build_encoder(encoder_spec(ident))
        if not info.same_weights(WeightsInfo(ident.get("weights", ""), ident.get("weights_sha256", ""))):
            raise UserError(
                f"the encoder weights at hand ({info.path or info.name}) differ from those the model was trained on "
                f"(sha256 {ident.get('weights_sha256', '')[:12]}...)"
            )
        return cls(
            decoder.to(device),
            vocab,
            trunk.to(device, memory_format=torch.channels_last),
            transform,
            dtype,
            device,
            checkpoint.max_steps(ckpt),
        )

    @torch.inference_mode()
    def caption(self, pixels: torch.Tensor, beam_size: int = 3) -> list[Decoded]:
        """(B, 3, H, W) uint8 -> decoded captions. Features are rounded to the store's dtype, as in training."""
        x = normalize(pixels.to(self.device), self.transform).contiguous(memory_format=torch.channels_last)
        feats = encode(self.encoder, x)
        feats = feats.to(torch.from_numpy(np.zeros(0, self.feature_dtype)).dtype)
        return beam_search(self.decoder, feats, beam_size, self.max_steps)

    def words(self, decoded: Decoded) -> list[str]:
        return [self.vocab.itos[t] for t in decoded.tokens]
