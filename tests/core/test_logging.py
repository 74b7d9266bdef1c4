"""The library reports through `logging`; the CLI prints its records as lines (console.terminal_logging): info on
stdout as it is, warnings on stderr as `warning: ...`, and on the torchrun ranks other than 0 warnings only."""

from __future__ import annotations

import logging

import pytest
from helpers_extract import fake_extract
from typer.testing import CliRunner

from cli import app
from pipeline import console


def test_extract_reports_through_logging_and_prints_nothing_itself(tmp_path, make_flickr8k, capsys, caplog):
    images = make_flickr8k(tmp_path / "imgs", 3)
    (images / "1002_img.jpg").write_bytes(b"not a picture")
    from pipeline.config import ExtractConfig

    cfg = ExtractConfig(images=images, store=tmp_path / "s.h5", device="cpu", workers=0)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        first = fake_extract()(cfg)
        again = fake_extract()(cfg)
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("pipeline.extract.encode", logging.WARNING, "skipped 1002_img.jpg: cannot decode it") in [
        (name, level, message.split(" (")[0]) for name, level, message in records
    ]
    assert (
        "pipeline.extract.plan",
        logging.INFO,
        f"{cfg.store} is already complete (2 images written, 1 skipped): nothing to do",
    ) in records
    printed = capsys.readouterr()  # no line but the progress bar's (on, as info is): the records are the caller's
    assert all(line.startswith("extract: 3/3 ") for line in printed.out.splitlines()) and printed.err == ""
    # the summary is returned, and rendered by the console module (the CLI's `done:` line)
    done = f"done: 2 images written, 1 skipped, 15 captions, 0.00 GiB at {cfg.store}, 2 this run in "
    assert console.extract_line(first).startswith(done)
    assert again["nothing_to_do"] and console.extract_line(again) is None


def test_without_logging_set_up_info_and_progress_are_off(capsys):
    """A script or a notebook that sets up no logging gets Python's defaults: info off, warnings on (to stderr,
    through logging.lastResort; under pytest its capture handler takes them instead)."""
    log = logging.getLogger("pipeline.somewhere")
    assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
    with console.progress(4, "steps") as advance:
        advance(4)
    assert capsys.readouterr().out == ""  # the progress bar follows info: off


@pytest.mark.parametrize("quiet", [False, True])
def test_terminal_logging_prints_info_and_warnings_as_lines(quiet, capsys):
    log = logging.getLogger("pipeline.stage")
    before = list(logging.getLogger("pipeline").handlers), logging.getLogger("pipeline").level
    with console.terminal_logging(quiet=quiet):
        log.info("resuming from run/last.pt after epoch 2")
        log.info("\na line after an empty one: 100% [not markup]")
        log.warning("skipped a.jpg: cannot decode it")
        with console.progress(2, "extract", unit="img") as advance:
            advance(2)
    captured = capsys.readouterr()
    lines = "resuming from run/last.pt after epoch 2\n\na line after an empty one: 100% [not markup]\n"
    assert captured.out.startswith("" if quiet else lines)
    assert ("extract: 2/2" in captured.out) is not quiet  # the plain progress line, rank 0 alone
    assert captured.err == "warning: skipped a.jpg: cannot decode it\n"  # every rank
    assert (list(logging.getLogger("pipeline").handlers), logging.getLogger("pipeline").level) == before


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_cli_prints_info_on_rank_0_alone_under_torchrun(rank, monkeypatch):
    """The rank decides when the CLI sets up its handler: no global toggled by the library."""
    import pipeline.train

    def fit(cfg):
        logging.getLogger("pipeline.train.recipe").info("fit: 14 train / 2 val images")
        logging.getLogger("pipeline.train.recipe").warning("SCST may collapse")
        return {}

    monkeypatch.setattr(pipeline.train, "fit", fit)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", rank)
    result = CliRunner().invoke(app, ["fit"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ("fit: 14 train / 2 val images\n" if rank == "0" else "")
    assert result.stderr == "warning: SCST may collapse\n"
