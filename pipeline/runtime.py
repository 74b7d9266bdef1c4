"""Device choice, autocast and worker counts: the few CUDA-vs-CPU decisions, in one place."""

from __future__ import annotations

import contextlib
import os

import torch

from pipeline.errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` is cuda when available, else cpu; `cuda` without a GPU is a user error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown --device {spec!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {spec!r} (use auto, cpu or cuda)")
    return device


def autocast(
    device: torch.device, enabled: bool | None = None, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Mixed precision. enabled=None: on CUDA (bf16, or fp16 on GPUs without bf16), off on CPU, where bf16
    pays only on CPUs with bf16 instructions (avx512_bf16/AMX: 1.3x on this project's test machine) and
    is slower elsewhere; enabled=True turns bf16 on for the CPU too."""
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def default_workers(processes: int = 1) -> int:
    """Decoding workers of each of `processes` processes on this machine (the ranks of a torchrun job on one
    node share its cores): its share of the cores - 1 (at most 16), leaving a core to feed the device. On a
    share of 2 cores or fewer, none: a worker then competes with torch's threads for the same cores, and
    decoding (~4 ms an image) is small next to the CPU ResNet50 (~90 ms); benchmarks: 12.5 img/s with 0
    workers vs 9.3 with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // processes
    return 0 if share <= 2 else min(16, share - 1)
