"""The training loss (masked cross-entropy, Show, Attend and Tell's attention penalty) and the validation loss.

The model holds no loss (as in timm): fit trains `CaptionTraining` (the decoder and `caption_loss` as one
module), and fit and evaluate report `validation_loss`. `masked_loss` is the plain definition that
`caption_loss` is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import Batches
from pipeline.model import CaptionModel, Decoder
from pipeline.runtime import autocast

# (model, features, tokens, penalty) -> (loss to optimise, masked cross-entropy)
LossFn = Callable[[Decoder | CaptionModel, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def caption_loss(
    model: Decoder | CaptionModel, features: torch.Tensor, tokens: torch.Tensor, penalty: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, masked cross-entropy) for features (B, h, w, C) as `model` takes them (a Decoder:
    (B, 7, 7, D); a CaptionModel: as stored) and tokens (B, G, T+1). One call of the model's forward.

    The output layer, the largest matmul at a real vocabulary size, runs on the non-<pad> steps only, and
    the recurrence stops for each image when its captions end: the same loss as masking full (B, G, T, V)
    logits (`masked_loss`)."""
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    # Images by decreasing caption length, so that step t runs only the images that still have words:
    # the loss is a mean over tokens, so the order does not change it.
    lengths = (targets != 0).sum(-1).amax(-1)  # (B,) steps each image needs
    order = torch.argsort(lengths, descending=True, stable=True)
    features, inputs, targets, lengths = features[order], inputs[order], targets[order], lengths[order]
    steps = torch.arange(inputs.shape[-1], device=lengths.device)
    active = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()
    keep = targets != 0
    logits, alphas = model(features, inputs, active, keep)  # (K, V) for the K non-<pad> steps, (B, G, T, P)
    loss = F.cross_entropy(logits.float(), targets[keep])
    total = loss + penalty * attention_penalty(alphas, targets) if penalty > 0 else loss
    return total, loss


class CaptionTraining(nn.Module):
    """What fit trains: the decoder and its loss as one module, `forward(features, tokens, weight)` ->
    (loss to optimise, masked cross-entropy).

    Under torchrun fit wraps this module in DistributedDataParallel, which synchronises gradients through
    `forward` only: the loss calls `decoder.recurrence` and `decoder.head`, not `decoder.forward`, so the
    whole loss must run inside the wrapped module's forward. Whatever else trains with the decoder belongs in
    this module too: fit passes a `model.CaptionModel` as `decoder`, whose forward runs layer4 on the stored
    layer3 rows first (`fit --finetune layer4`).

    `weight` scales the loss to optimise: 1 in one process. Under torchrun it is the number of processes x this
    process's share of the step's target tokens, so that DDP's average of the ranks' gradients is the gradient
    of the mean over all the step's tokens, as one process with the whole global batch computes it (see
    `data.Batches`). The attention penalty, a mean over images, gets the same token weight: exact for the
    cross-entropy, and off by default."""

    def __init__(self, decoder: Decoder | CaptionModel, penalty: float = 0.0, loss_fn: LossFn = caption_loss) -> None:
        super().__init__()
        self.decoder = decoder
        self.penalty = penalty
        self.loss_fn = loss_fn  # caption_loss; fit --compile compiles the decoder's cell instead (model.compile_cell)

    def forward(
        self, features: torch.Tensor, tokens: torch.Tensor, weight: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total, loss = self.loss_fn(self.decoder, features, tokens, self.penalty)
        # outside loss_fn: a compiled loss would be recompiled for every new float
        return (total if weight == 1.0 else total * weight), loss


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy over the tokens that are not <pad>."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id)


def attention_penalty(alphas: torch.Tensor, targets: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Show, Attend and Tell's doubly stochastic regulariser: each cell's attention summed over the
    real steps should be close to 1. alphas (B, G, T, P), targets (B, G, T)."""
    mask = (targets != pad_id).unsqueeze(-1).to(alphas.dtype)
    return ((1.0 - (alphas * mask).sum(dim=2)) ** 2).mean()


@torch.no_grad()
def validation_loss(model: Decoder | CaptionModel, batches: Batches, amp: bool | None = None) -> float:
    """Mean masked cross-entropy per token over the fixed validation captions (`data.validation_batches`)."""
    total, tokens = validation_sums(model, batches, amp)
    return total / max(tokens, 1)


@torch.no_grad()
def validation_sums(model: Decoder | CaptionModel, batches: Batches, amp: bool | None = None) -> tuple[float, int]:
    """(summed masked cross-entropy, target tokens) over `batches`: what each rank adds up under torchrun."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches.iterate(None, 0):
        with autocast(batch.features.device, amp):
            _, loss = caption_loss(model, batch.features, batch.tokens)
        n = int((batch.tokens[..., 1:] != 0).sum())
        total += float(loss) * n
        tokens += n
    return total, tokens
