"""`extract()`: one code path for one process and for each rank of a torchrun job. In one process `Dist` does
nothing (every decision is made here, the rows are all this process's, the writer is store.Writer); under
torchrun, rank 0 alone decides what the store is and every rank encodes and writes its share of the rows."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch

from pipeline.datasets import CaptionSet, read_captions
from pipeline.distributed import Dist, session
from pipeline.encoder import build_encoder
from pipeline.errors import UserError
from pipeline.extract.config import EncoderFactory, ExtractConfig, provenance
from pipeline.extract.encode import extract_rows
from pipeline.extract.jpegs import announce, decode_device, decoder_name
from pipeline.extract.plan import check_options, check_written, lock_store, prepare_store, store_counts
from pipeline.extract.shared import writer_for
from pipeline.runtime import default_workers

log = logging.getLogger(__name__)


def extract(
    cfg: ExtractConfig, encoder_factory: EncoderFactory = build_encoder, jpeg_device: str | None = None
) -> dict:
    """Fill the store for every captioned, decodable image; resumable. Returns the run's summary (under
    torchrun the same on every rank, but `bytes`: rank 0's), which the console module's `extract_line` renders
    as the `done:` line (`nothing_to_do`: the store was complete already, as extract said).
    `encoder_factory(weights, layer)` builds the trunk and its provenance (pipeline.encoder.build_encoder; tests
    pass a cheap stand-in). `jpeg_device`: decode plain JPEGs batched on this device whatever cfg.decode says
    (tests run the GPU path's code with "cpu"); None: as cfg.decode and the device decide (jpegs.decode_device)."""
    start = time.perf_counter()
    images, path = Path(cfg.images), Path(cfg.store)
    with session(cfg.device) as dist:
        with contextlib.ExitStack() as held:  # the store's lock, rank 0's, until the rows are written
            # one process a node makes the checks that write a probe file (pids differ within a node only)
            dist.check(lambda: check_options(cfg) if dist.local_rank == 0 else None)
            if jpeg_device is not None:
                decode_on: torch.device | None = torch.device(jpeg_device)
            else:
                decode_on = dist.check(lambda: decode_device(cfg.decode, dist.device))
            old = dist.decide(lambda: lock_store(path, held))
            captions = dist.check(lambda: _read_captions(cfg, images, dist))
            # rank 0 of each node first: an ImageNet download then happens once per node
            built = dist.check(lambda: encoder_factory(cfg.weights, cfg.layer) if dist.local_rank == 0 else None)
            trunk, weights = dist.check(lambda: built or encoder_factory(cfg.weights, cfg.layer))
            prov = provenance(weights.to_dict(), cfg.transform, cfg.dtype, cfg.layer, decoder_name(decode_on))
            summary = {"store": str(path), "images": len(captions), "captions": sum(map(len, captions.captions))}
            rows = dist.decide(lambda: prepare_store(cfg, captions, prov, old))
            if rows is None:
                zero = {"written_now": 0, "skipped_now": 0, "unreadable_now": 0, "device_decoded_now": 0}
                zero["nothing_to_do"] = True
                return summary | store_counts(old) | zero | {"seconds": time.perf_counter() - start}
            open_writer = writer_for(dist, path, rows)
            mine = dist.part(rows)
            if dist.enabled:
                log.info(f"extract: {len(rows)} images over {dist.world} processes ({len(mine)} on rank 0)")
            run_cfg = _workers(cfg, dist)
            if dist.is_main:
                announce(decode_on, run_cfg.workers or 0)
            counts, now = extract_rows(run_cfg, trunk, dist.device, captions, mine, open_writer, decode_on)
            now = dict(zip(now, (int(v) for v in dist.sum(*now.values())), strict=True))
        dist.check(lambda: check_written(images, counts))  # the same counts on every rank: rank 0 reports
        return summary | counts | now | _report(dist, path, time.perf_counter() - start)


def _read_captions(cfg: ExtractConfig, images: Path, dist: Dist) -> CaptionSet:
    """Every rank reads the captions (it needs the image names of its share); rank 0 reports on them."""
    captions = read_captions(images, cfg.captions)
    if dist.is_main:
        log.info(f"captions: {captions.source} ({captions.layout}), {len(captions)} images on disk")
        for reason, count in sorted(captions.problems.items()):
            if count:
                log.warning(f"{count} {reason}")
    if not captions.images:
        raise UserError(f"none of the captioned images were found under {images}")
    return captions


def _workers(cfg: ExtractConfig, dist: Dist) -> ExtractConfig:
    """Decoding workers per process: the node's cores shared by its ranks (runtime.default_workers)."""
    if cfg.workers is not None:
        return cfg
    return dataclasses.replace(cfg, workers=default_workers(dist.local_world))


def _report(dist: Dist, path: Path, seconds: float) -> dict:
    """The summary's timing, processes and (rank 0's) size: what the `done:` line says (extract_line)."""
    size = {"bytes": path.stat().st_size} if dist.is_main else {}
    return {"nothing_to_do": False, "processes": dist.world, "seconds": seconds} | size
