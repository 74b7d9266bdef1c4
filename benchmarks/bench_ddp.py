"""Section `ddp`: fit's training step in one process and under torchrun (DistributedDataParallel), samples/s.

Each configuration runs in fresh processes: one process is `python -m benchmarks.bench_ddp --worker ...`
(fit's single-process path: no process group, no wrapper), N processes are
`python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.bench_ddp --worker ...`. The
worker trains the report's decoder as fit does (Batches over the memory-mapped store, sharded by rank;
loss.CaptionTraining, wrapped in DDP under torchrun; train.train_step), times a number of steps between two
barriers, and rank 0 writes the figures.

On a CPU the processes share the machine's cores: torchrun gives each process one thread by default
(OMP_NUM_THREADS=1), while one process uses them all. So on 2 cores, "2 processes" against "1 process, 2
threads" compares two ways of using the same 2 cores, plus DDP's gradient all-reduce over loopback: it can show
the cost of DDP and of process-level parallelism, not the scaling of more GPUs. On a GPU machine every process
drives its own GPU, which is what the section is for there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, Context, Table, vocabulary

WARMUP = 2


def _configs(ctx: Context) -> list[dict]:
    """(processes, threads per process, batch per process); global batch = processes x batch."""
    if ctx.device.type == "cuda":
        gpus = torch.cuda.device_count()
        counts = sorted({1, 2, 4, 8, gpus} & set(range(1, gpus + 1)))
        return [{"processes": n, "threads": None, "batch": 32} for n in counts]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(2, cores)
    return [
        {"processes": 1, "threads": cores, "batch": 32},  # fit as it runs today
        {"processes": 1, "threads": 1, "batch": 32},
        {"processes": n, "threads": max(cores // n, 1), "batch": 32 // n},  # the same global batch of 32
        {"processes": 1, "threads": cores, "batch": 32 * n},
        {"processes": n, "threads": max(cores // n, 1), "batch": 32},  # 32 per process
    ]


def run(ctx: Context) -> list[Table]:
    store = ctx.flickr_store()
    vocab = vocabulary("ours")
    vocab_file = ctx.workdir / "ddp_vocab.json"
    vocab_file.write_text(json.dumps(vocab.to_list()), encoding="utf-8")
    steps = ctx.pick(1, 15)
    rows = []
    configs = _configs(ctx)
    if ctx.quick and ctx.device.type == "cpu":
        configs = configs[1:3]  # 1 process and N processes at the same global batch: each row starts processes
    for c in configs:
        ctx.log(f"ddp: {c['processes']} process(es), {c['threads'] or 'default'} thread(s), batch {c['batch']}")
        result = ctx.workdir / "ddp_result.json"
        result.unlink(missing_ok=True)
        worker = ["-m", "benchmarks.bench_ddp", "--worker", "--store", str(store), "--vocab", str(vocab_file),
                  "--batch", str(c["batch"]), "--steps", str(steps),
                  "--device", ctx.device.type, "--out", str(result)]  # fmt: skip
        if c["processes"] > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={c['processes']}", *worker]  # fmt: skip
        else:
            cmd = [sys.executable, *worker]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        if c["threads"]:
            env["OMP_NUM_THREADS"] = str(c["threads"])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"worker failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
        r = json.loads(result.read_text(encoding="utf-8"))
        rows.append(c | r | {"global_batch": c["batch"] * c["processes"], "wall_s": time.perf_counter() - t0})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_first"] = r["samples_per_s"] / base
    dev = ctx.device.type
    return [
        Table(
            f"ddp: fit's training step in 1 and several processes ({dev}), report decoder, vocabulary "
            f"{len(vocab):,} (ours)",
            [
                ("processes", "processes", "d"),
                ("threads", "threads each", ""),
                ("batch", "batch per process", "d"),
                ("global_batch", "global batch", "d"),
                ("steps", "steps timed", "d"),
                ("samples_per_s", "samples/s (all processes)", ",.1f"),
                ("step_s", "s per step", ".3f"),
                ("vs_first", "vs first row", ".2f"),
            ],
            rows,
            [
                "each row runs in fresh processes: 1 process without torchrun (no process group, no DDP), N "
                "processes under torchrun (gloo on the CPU, nccl on GPUs); Batches over the memory-mapped store, "
                "sharded by rank; loss.CaptionTraining (DDP-wrapped under torchrun); train.train_step.",
                f"{WARMUP} warm-up steps, then {steps} steps between two barriers; samples = captions trained by "
                "all the processes (one caption an image).",
                "on a CPU the processes share the same cores (torchrun's default is one thread a process): 2 "
                "processes on 2 cores show what DDP costs (a gradient all-reduce of every parameter each step, "
                "over loopback) against one process using both cores with threads; they cannot show scaling "
                "across GPUs, where each process brings its own device.",
            ],
        )
    ]


def worker(args: argparse.Namespace) -> None:
    """One process's share of the benchmark (every rank under torchrun runs this)."""
    from pipeline.data import Batches, CaptionIndex, feature_scale
    from pipeline.distributed import session
    from pipeline.loss import CaptionTraining
    from pipeline.model import Decoder, DecoderConfig
    from pipeline.store import FeatureStore
    from pipeline.train import TrainConfig, make_optimizer, train_step
    from pipeline.vocab import MAX_LEN, Vocabulary

    with session(args.device) as dist:
        store = FeatureStore(args.store)
        vocab = Vocabulary.from_list(json.loads(Path(args.vocab).read_text(encoding="utf-8")))
        rows = store.split_rows("train")
        captions = CaptionIndex.build(vocab, store.caption_text, store.caption_image, len(store), MAX_LEN)
        batches = Batches(store, captions, rows, args.batch, 1, dist.device, dist.rank, dist.world)
        torch.manual_seed(0)
        model = Decoder(DecoderConfig(vocab_size=len(vocab), feature_scale=feature_scale(store.features, rows)))
        model.to(dist.device).train()
        module = dist.wrap(CaptionTraining(model))
        optimizer = make_optimizer(model, 1e-3)
        cfg = TrainConfig()

        def forever():
            epoch = 1
            while True:
                yield from batches.iterate(epoch, 0)
                epoch += 1

        stream = forever()
        for _ in range(WARMUP):
            train_step(module, optimizer, next(stream), cfg)
        dist.barrier()
        t0 = time.perf_counter()
        samples = 0
        for _ in range(args.steps):  # a fixed count: the processes must run the same steps
            batch = next(stream)
            train_step(module, optimizer, batch, cfg)
            samples += batch.tokens.shape[0] * batch.tokens.shape[1]
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        dist.barrier()
        seconds = time.perf_counter() - t0
        (total,) = dist.sum(samples)
        if dist.is_main:
            figures = {"steps": args.steps, "samples_per_s": total / seconds, "step_s": seconds / args.steps,
                       "torch_threads": torch.get_num_threads(), "world": dist.world}  # fmt: skip
            Path(args.out).write_text(json.dumps(figures), encoding="utf-8")
        stream.close()  # stops the prefetch thread
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--store", required=True)
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
