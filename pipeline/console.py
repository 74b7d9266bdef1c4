"""Terminal output. The library reports through `logging` (the `pipeline` logger and its children); while a
command of the CLI runs, `terminal_logging` prints those records as lines: info on stdout as it is, warnings on
stderr as `warning: ...`. Here too: a Rich progress bar on a TTY and plain lines elsewhere, and the rendering of
results that the library returns as data (evaluate's scores, generate's captions, extract's summary)."""

from __future__ import annotations

import json
import logging
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
log = logging.getLogger("pipeline")  # every library module logs to a child of it (logging.getLogger(__name__))


class _Lines(logging.Handler):
    """A record as a line: below WARNING on stdout as it is, WARNING and above on stderr as `warning: ...` in
    yellow; no time or level columns (RichHandler's). Through the Rich consoles, which write to the sys.stdout
    and sys.stderr of the moment: a live progress bar (which redirects them) stays below the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                err.print(f"warning: {message}", markup=False, style="yellow")
            else:
                out.print(message, markup=False)
        except Exception:
            self.handleError(record)


@contextmanager
def terminal_logging(quiet: bool = False) -> Iterator[None]:
    """For the length of a CLI command: the `pipeline` logger's records printed as lines (`_Lines`), from INFO
    on; `quiet` (the ranks other than 0 of a torchrun job): from WARNING on, and no progress bar. Undone on the
    way out. Without it (a script, a test, a notebook) Python's defaults hold: warnings on stderr, info silent."""
    handler, level = _Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


class _Rate:
    """Items per second since the start, for the plain progress lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, done: int) -> float:
        return done / max(time.perf_counter() - self.start, 1e-9)


@contextmanager
def progress(total: int, description: str, unit: str = "it") -> Iterator[callable]:
    """Yield ``advance(n)``; a live Rich bar with rate and ETA on a TTY, a line every ~10% otherwise; nothing
    where the `pipeline` logger's info is off (a torchrun rank other than 0, a script that set no logging)."""
    if not log.isEnabledFor(logging.INFO):
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


def extract_line(summary: dict) -> str | None:
    """extract's closing `done:` line, from the summary it returns; None when it had nothing to do (it said so)."""
    if summary["nothing_to_do"]:
        return None
    by = f" by {summary['processes']} processes" if summary["processes"] > 1 else ""
    return (
        f"done: {summary['images_written']} images written, {_skipped(summary)}, {summary['captions']} captions, "
        f"{summary['bytes'] / 2**30:.2f} GiB at {summary['store']}, {summary['written_now']} this run{by} in "
        f"{summary['seconds']:.1f}s"
    )


def _skipped(counts: dict) -> str:
    """How many rows are skipped, and why, for the `done:` line."""
    undecodable, unreadable = counts["images_skipped"], counts["images_unreadable"]
    if not unreadable:
        return f"{undecodable} skipped"
    return (
        f"{undecodable + unreadable} skipped ({undecodable} undecodable, {unreadable} unreadable: "
        "rerun to retry the unreadable ones)"
    )


def print_extract_summary(summary: dict) -> None:
    """extract's `done:` line on stdout, where info is on (rank 0 alone under torchrun: the others' summaries
    lack `bytes`)."""
    line = extract_line(summary) if log.isEnabledFor(logging.INFO) else None
    if line is not None:
        out.print(line, markup=False)
