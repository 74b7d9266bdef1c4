"""One optimisation step: what fit runs per batch, and the benchmarks measure."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from pipeline.config import TrainConfig
from pipeline.runtime import autocast


def train_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, cfg: TrainConfig) -> torch.Tensor:
    """One optimisation step on a batch; returns the (detached) masked loss times the batch's weight (the
    loss itself in one process). `module` is a loss.CaptionTraining (DDP-wrapped under torchrun). fit and the
    benchmarks use it."""
    with autocast(batch.features.device, cfg.amp):
        total, loss = module(batch.features, batch.tokens, batch.weight)
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # under DDP: the gradients are averaged over the ranks here
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach() if batch.weight == 1.0 else loss.detach() * batch.weight


def rate_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """The factor on every base rate at optimizer step `step` (from 0, over the whole run) of `total`
    cross-entropy steps: the linear warm-up, (step + 1) / warmup_steps over the first warmup_steps, times the
    schedule's: 1 (constant) or the half cosine from 1 to 0 over the run (cosine). A function of the step alone,
    so a resumed run continues it with no state of its own."""
    factor = (step + 1) / warmup_steps if 0 <= step < warmup_steps else 1.0
    if schedule == "cosine" and total > 0:
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return factor


@contextlib.contextmanager
def scaled_rates(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Within the block, every rate is multiplied by `factor` (rate_factor's); restored afterwards, so the
    epoch scheduler (StepLR) and the checkpoint only ever see the base rates."""
    if factor == 1.0:
        yield
        return
    base = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr
