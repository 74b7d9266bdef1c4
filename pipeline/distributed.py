"""Running under `torchrun`: the process group, this process's rank and device, and the few collectives that
fit and extract use. Everything about torch.distributed lives here.

`session(device)` is the one entry point. Without torchrun (no RANK/WORLD_SIZE/LOCAL_RANK in the environment),
or with a world of one process, it yields a `Dist` of one process and never creates a process group: every
collective below is then a no-op that returns its input unchanged, so a single process runs exactly the code
and the arithmetic it ran before this module existed. Under torchrun it creates the group (nccl on GPUs, gloo
on the CPU), binds the process to the GPU of its local rank, and destroys the group on the way out. (Info lines
and progress bars come from rank 0 alone: the CLI sets that up by the rank: terminal_logging, pipeline/console)

Errors. A decision that only rank 0 can make (refusing an OUT that holds an earlier run, reading last.pt) is
`decide`d there and broadcast, and a check every rank makes (opening its store) is `check`ed and agreed: in
both cases every rank raises the same UserError, rank 0 prints it, the others stay quiet, and every rank exits
with status 1. Anything else (a crash, a kill, an out-of-memory on one GPU) ends that process; torchrun's
agent then stops the other ranks and reports which one failed. Every collective has a timeout
(CAPTIONER_DIST_TIMEOUT seconds, default 1800), so that even a rank stuck while alive cannot hang a job forever.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from pipeline.errors import UserError, describe
from pipeline.runtime import resolve_device

T = TypeVar("T")

TIMEOUT_ENV = "CAPTIONER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # a checkpoint of a fine-tuned model on a slow shared disk, CIDEr-D on rank 0 ...


@dataclass(frozen=True)
class Launch:
    """What torchrun tells each process it starts."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def launched() -> Launch | None:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE) from the environment; None without them."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if not (0 <= rank < world and 0 <= local < local_world):
        raise UserError(f"inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local}")
    return Launch(rank, world, local, local_world)


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    launch = launched()
    return launch.world if launch else 1


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds, not {raw!r}") from None
    return timedelta(seconds=seconds)


class AgreedError(UserError):
    """A UserError that every rank raises for one decision (`Dist.decide`, `Dist.check`): only rank 0's copy
    is printed (the others are `quiet`), and the ranks can leave the group in order."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. `Dist()` is a job of one process: no group, every method a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    # -- agreement -----------------------------------------------------------------------------------------
    def decide(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give every rank its result, or raise its UserError on every rank.
        For what rank 0 alone may look at (OUT, the store being written) before anything is written."""
        if not self.enabled:
            return fn()
        payload: list = [None]
        if self.is_main:
            try:
                payload = [("ok", fn())]
            except UserError as e:
                payload = [("error", str(e))]
        tdist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise AgreedError(value, quiet=not self.is_main)
        return value

    def check(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; when it raises a UserError on any rank, raise it on every rank (the lowest
        failing rank's message, naming that rank when it is not 0), so that no rank waits for the others."""
        if not self.enabled:
            return fn()
        result: T | None = None
        error: str | None = None
        try:
            result = fn()
        except UserError as e:
            error = str(e)
        errors: list[str | None] = [None] * self.world
        tdist.all_gather_object(errors, error)
        for rank, message in enumerate(errors):
            if message is not None:
                raise AgreedError(message if rank == 0 else f"rank {rank}: {message}", quiet=not self.is_main)
        return result  # type: ignore[return-value]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (small picklable objects: a metrics record, a decision)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    # -- arithmetic --------------------------------------------------------------------------------------
    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (float64). One process: the values, untouched."""
        if not self.enabled:
            return tuple(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return tuple(float(v) for v in t.cpu())

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's (n_r, ...) int64 rows, concatenated in rank order, on every rank. The ranks may hold
        different numbers of rows: each pads its block to the largest count before one all_gather of
        equal-shaped tensors (an unpadded gather of variable-size tensors is what crashes), and the padding
        is cut off again."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not self.enabled:
            return rows
        count = torch.tensor([len(rows)], dtype=torch.int64, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        tdist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        if max(sizes) == 0:
            return rows
        padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=torch.int64)
        padded[: len(rows)] = torch.from_numpy(rows)
        padded = padded.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu().numpy()

    def gather_sequences(self, seqs: list[list[int]], width: int) -> list[list[int]]:
        """Variable-length id sequences (at most `width` long) of every rank, in rank order: padded to
        `width` with -1 for the gather, unpadded after."""
        if not self.enabled:
            return [list(s) for s in seqs]
        block = np.full((len(seqs), width), -1, dtype=np.int64)
        for i, s in enumerate(seqs):
            block[i, : len(s)] = s
        return [[int(t) for t in row if t >= 0] for row in self.gather_rows(block)]

    # -- work split ------------------------------------------------------------------------------------
    def part(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of `items` (sizes differ by at most one; concatenated in rank order
        they are `items` again). One process: `items`."""
        if not self.enabled:
            return items
        return np.array_split(items, self.world)[self.rank]

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Under torchrun, reseed torch's generators from (seed, epoch, rank) before each epoch: each rank
        then draws its own dropout masks, and an epoch's masks do not depend on how many epochs ran in this
        process, so that --resume continues exactly. One process keeps one stream for the whole run (saved in
        last.pt), as before."""
        if self.enabled:
            torch.manual_seed(int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0]))

    def wrap(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """DistributedDataParallel around `module` under torchrun (gradients averaged over the ranks during
        backward); the module itself for one process. find_unused_parameters: some trainable parameters get
        no gradient in some steps (layer4 in the epochs before `fit --finetune-after`)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            module,
            device_ids=ids,
            output_device=ids[0] if ids else None,
            find_unused_parameters=find_unused_parameters,
        )


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """This process's Dist for the length of a command. One process: resolve the device and nothing else.
    Under torchrun with several processes: one GPU per local rank (cuda:LOCAL_RANK) or the CPU, a process group
    (nccl or gloo; an existing group, made by a script that calls fit itself, is used and left in place)."""
    launch = launched()
    if launch is None or launch.world == 1:
        yield Dist(device=resolve_device(device))
        return
    try:
        dev = resolve_device(device)
        if dev.type == "cuda":
            if launch.local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"torchrun started {launch.local_world} processes on this node, which has "
                    f"{torch.cuda.device_count()} GPUs: pass --nproc-per-node {torch.cuda.device_count()} or fewer"
                )
            dev = torch.device("cuda", launch.local_rank)
            torch.cuda.set_device(dev)
    except UserError as e:  # the same check fails on every rank: rank 0 reports it
        raise AgreedError(str(e), launch.rank != 0) from None
    created = not tdist.is_initialized()
    if created:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            tdist.init_process_group(backend, timeout=timeout(), device_id=dev if dev.type == "cuda" else None)
        except (RuntimeError, ValueError) as e:  # rendezvous failed, a port in use, no MASTER_ADDR...
            raise UserError(f"cannot join the torchrun job (rank {launch.rank}): {describe(e)}") from None
    dist = Dist(launch.rank, launch.world, launch.local_rank, launch.local_world, dev)
    clean = False
    try:
        yield dist
        dist.barrier()  # every rank done (rank 0's last files written) before any leaves the group
        clean = True
    except AgreedError:
        clean = True  # every rank raised it at the same point: the group can be taken down in order
        raise
    # any other error is this rank's alone: leave at once (no barrier, no teardown); torchrun stops the others
    finally:
        if created and clean:
            tdist.destroy_process_group()
