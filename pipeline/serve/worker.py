"""The model thread: one thread (`captioner-model`) calls the model, so model calls never overlap; requests that
queue up while it is busy are captioned together, one batch per beam size."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from pipeline.captioner import Captioner

log = logging.getLogger(__name__)


@dataclass
class _Job:
    pixels: torch.Tensor  # (3, S, S) uint8
    beam_size: int
    future: Future


class ModelWorker:
    """The one thread that calls the model. Each round takes every job queued so far (up to `max_batch`),
    groups them by beam size and captions each group in one `Captioner.caption` call."""

    def __init__(self, captioner: Captioner, max_batch: int = 8) -> None:
        self.captioner = captioner
        self.max_batch = max(1, max_batch)
        self.images = 0  # captioned so far
        self.batches = 0  # model calls so far
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="captioner-model", daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor, beam_size: int) -> Future:
        """Queue one image; the future gets its Decoded (with the n-best `beams`)."""
        job = _Job(pixels, beam_size, Future())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _take(self) -> tuple[list[_Job], bool]:
        """Block for one job, then add whatever else is already queued. Returns (jobs, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, stop = [first], False
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return [j for j in jobs if j.future.set_running_or_notify_cancel()], stop

    def _run(self) -> None:
        try:
            self.captioner.warm_up()  # requests that come meanwhile wait in the queue
        except Exception:  # each request then gets the error (a 500, logged) from its own model call
            log.exception("warming up the model failed")
        stop = False
        while not stop:
            jobs, stop = self._take()
            for beam in sorted({j.beam_size for j in jobs}):
                group = [j for j in jobs if j.beam_size == beam]
                try:
                    decoded = self.captioner.caption(torch.stack([j.pixels for j in group]), beam, n_best=beam)
                except Exception as e:  # handed to the requests, which answer 500 and log it
                    for j in group:
                        j.future.set_exception(e)
                    continue
                self.images += len(group)
                self.batches += 1
                for j, d in zip(group, decoded, strict=True):
                    j.future.set_result(d)
