"""Terminal output: warnings on stderr, a Rich progress bar on a TTY and plain lines elsewhere, and the
rendering of results that the library returns as data (evaluate's scores, generate's captions)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_quiet = False  # info lines and progress off: the ranks other than 0 of a torchrun job


def set_quiet(quiet: bool) -> bool:
    """Silence (or restore) info lines and progress; warnings still print. Returns the previous setting."""
    global _quiet
    previous, _quiet = _quiet, quiet
    return previous


def info(message: str) -> None:
    """A line of normal output (stdout)."""
    if not _quiet:
        out.print(message, markup=False)


def warn(message: str) -> None:
    """A warning line on stderr; the run goes on."""
    err.print(f"warning: {message}", markup=False, style="yellow")


class _Rate:
    """Items per second since the start, for the plain progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, done: int) -> float:
        return done / max(time.perf_counter() - self.start, 1e-9)


@contextmanager
def progress(total: int, description: str, unit: str = "it") -> Iterator[callable]:
    """Yield ``advance(n)``; a live Rich bar with rate and ETA on a TTY, a line every ~10% otherwise."""
    if _quiet:
        yield lambda n=1, **fields: None
        return
    if out.is_terminal:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        rate = _Rate()
        with Progress(*columns, console=out, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            done = 0

            def advance(n: int = 1, **fields: str) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n, rate=f"{rate(done):,.1f} {unit}/s", **fields)

            yield advance
        return

    rate = _Rate()
    state = {"done": 0, "next": max(total // 10, 1), "last": time.perf_counter()}

    def advance_plain(n: int = 1, **fields: str) -> None:
        state["done"] += n
        now = time.perf_counter()
        if state["done"] >= state["next"] or state["done"] == total or now - state["last"] > 30:
            state["next"] = state["done"] + max(total // 10, 1)
            state["last"] = now
            done = state["done"]
            speed = rate(done)
            eta = (total - done) / speed if speed > 0 else float("inf")
            extra = "".join(f" {k}={v}" for k, v in fields.items())
            print(f"{description}: {done}/{total} {speed:,.1f} {unit}/s eta {eta:,.0f}s{extra}", flush=True)

    yield advance_plain
    sys.stdout.flush()


def print_scores(result: dict) -> None:
    """evaluate's result as a table: each metric, the loss and the perplexity, the tokenizer."""
    d = result["details"]
    table = Table(title=f"{d['split']} split: {d['images']} images, beam {d['beam_size']}, epoch {d['epoch']}")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in result["metrics"].items():  # in the contract's order: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
        table.add_row(name, f"{value:.4f}")
    table.add_row("loss (masked, per token)", f"{d['loss']:.4f}")
    table.add_row("perplexity", f"{d['perplexity']:.2f}")
    table.caption = f"tokenizer: {d['tokenizer']}"
    out.print(table)


def caption_line(item: dict, as_json: bool = False) -> str:
    """One of generate's captions as printed: `PATH: caption`, or the JSON object of `--json`; with its
    attention figure, `PATH: caption  (attention figure: FIGURE)`, or the object's "attention"."""
    figure = item.get("attention")
    if as_json:
        shown = {"image": item["image"], "caption": item["caption"]}
        return json.dumps(shown | {"attention": figure} if figure else shown)
    return f"{item['image']}: {item['caption']}" + (f"  (attention figure: {figure})" if figure else "")
