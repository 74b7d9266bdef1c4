"""One optimisation step: what fit runs per batch, and the benchmarks measure."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, warmup_steps: int, step: int) -> Iterator[None]:
    """Within the block, every rate is scaled by (step + 1) / warmup_steps while step < warmup_steps (`step`
    counts from 0 over the whole run, so a resumed run continues the ramp). The rates are restored afterwards:
    the scheduler and the checkpoint only ever see the base rates, and no state is added."""
    if warmup_steps <= 0 or step >= warmup_steps:
        yield
        return
    base = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * (step + 1) / warmup_steps
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr
