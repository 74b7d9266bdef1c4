"""cli.py builds exactly the config each pipeline function receives, and prints what the library returns.

Each command's pipeline function is patched with a recorder (nothing is trained or read): with no options the
config equals the dataclass defaults (the CLI declares no default of its own), and with every option it holds
exactly what was typed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import app
from pipeline.config import (
    EVAL_SPLITS,
    DemoConfig,
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    ServeConfig,
    TrainConfig,
)

EXTRACT_SUMMARY = {
    "store": "s.h5", "images": 5, "captions": 24, "images_written": 4, "images_skipped": 1, "images_unreadable": 0,
    "written_now": 3, "skipped_now": 0, "unreadable_now": 0, "nothing_to_do": False, "processes": 1,
    "seconds": 2.04, "bytes": 3 * 2**29,
}  # fmt: skip


@pytest.fixture
def calls(monkeypatch):
    """Replace the pipeline entry points with recorders; returns the list of (name, config) calls."""
    import pipeline.demo
    import pipeline.evaluate
    import pipeline.extract
    import pipeline.generate
    import pipeline.serve
    import pipeline.train

    seen: list[tuple[str, object]] = []

    def recorder(name, result=None):
        def fn(cfg):
            seen.append((name, cfg))
            return result(cfg) if callable(result) else result

        return fn

    evaluation = {
        "metrics": {"BLEU-1": 0.5, "CIDEr-D": 1.25},
        "captions": [],
        "details": {
            "split": "test",
            "images": 2,
            "beam_size": 3,
            "epoch": 4,
            "loss": 2.0,
            "perplexity": 7.39,
            "tokenizer": "ptb",
        },
    }

    def captions(cfg):
        return iter([{"image": "a.jpg", "caption": "a dog ."}, {"image": "b.jpg", "caption": "a cat ."}])

    monkeypatch.setattr(pipeline.train, "fit", recorder("fit", {}))
    monkeypatch.setattr(pipeline.evaluate, "evaluate", recorder("evaluate", evaluation))
    monkeypatch.setattr(pipeline.generate, "generate", recorder("generate", captions))
    monkeypatch.setattr(pipeline.demo, "demo", recorder("demo", {}))
    monkeypatch.setattr(pipeline.extract, "extract", recorder("extract", EXTRACT_SUMMARY))
    monkeypatch.setattr(pipeline.serve, "serve", recorder("serve"))
    return seen


def _invoke(*args: str | Path):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_fit_defaults_are_the_config_defaults(calls):
    _invoke("fit")
    assert calls == [("fit", TrainConfig())]


def test_fit_passes_every_option(calls):
    _invoke(
        "fit", "--store", "s.h5", "--out", "run", "--epochs", "7", "--batch-size", "9", "--lr", "0.002",
        "--resume", "--device", "cpu", "--seed", "3", "--min-word-count", "2", "--captions-per-image", "4",
        "--grad-clip", "1.5", "--lr-step", "10", "--lr-gamma", "0.5", "--decoder", "tiny", "--init-from-features",
        "--dropout", "0.2", "--gate", "--attention-penalty", "1", "--val-decode-images", "50", "--amp", "--compile",
        "--feature-norm", "rms", "--finetune", "layer4", "--encoder-lr", "0.0005", "--finetune-after", "2",
        "--scst-after", "5", "--scst-baseline", "greedy", "--lr-schedule", "cosine", "--init-from-grid", "0",
        "--init-drop", "0.25",
    )  # fmt: skip
    expected = TrainConfig(
        store="s.h5", out="run", epochs=7, batch_size=9, lr=0.002, resume=True, device="cpu", seed=3,
        min_word_count=2, captions_per_image=4, grad_clip=1.5, lr_step=10, lr_gamma=0.5, decoder="tiny",
        init_from_features=True, dropout=0.2, gate=True, attention_penalty=1.0, val_decode_images=50, amp=True,
        compile=True, feature_norm="rms", finetune="layer4", encoder_lr=0.0005, finetune_after=2,
        scst_after=5, scst_baseline="greedy", lr_schedule="cosine", init_from_grid=0, init_drop=0.25,
        typed=("amp", "attention_penalty", "batch_size", "captions_per_image", "compile", "decoder", "device",
               "dropout", "encoder_lr", "epochs", "feature_norm", "finetune", "finetune_after", "gate", "grad_clip",
               "init_drop", "init_from_features", "init_from_grid", "lr", "lr_gamma", "lr_schedule", "lr_step",
               "min_word_count", "out", "resume", "scst_after", "scst_baseline", "seed", "store", "val_decode_images"),
    )  # fmt: skip
    assert calls == [("fit", expected)]
    _invoke("fit", "--no-amp")
    assert calls[-1] == ("fit", TrainConfig(amp=False, typed=("amp",)))
    _invoke("fit", "--lr", "0.001")  # typed, though it is the default: with --resume it must agree with last.pt
    assert calls[-1] == ("fit", TrainConfig(typed=("lr",)))
    assert TrainConfig().finetune is None and TrainConfig().encoder_lr == 1e-4 and TrainConfig().finetune_after == 0
    result = CliRunner().invoke(app, ["fit", "--finetune", "layer3"])  # only layer4 is fine-tuned
    assert result.exit_code == 2 and len(calls) == 3


def test_out_of_gpu_memory_is_one_line_without_torchs_advice(monkeypatch):
    """torch's message is one long line that ends in advice for programmers (PYTORCH_CUDA_ALLOC_CONF=...)."""
    import torch

    import pipeline.train

    message = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB "
        "is free. Of the allocated memory 76.1 GiB is allocated by PyTorch. If reserved but unallocated memory is "
        "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
        "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )

    def fit(cfg):
        raise torch.cuda.OutOfMemoryError(message)

    monkeypatch.setattr(pipeline.train, "fit", fit)
    result = CliRunner().invoke(app, ["fit"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: out of GPU memory (tried to allocate 2.00 GiB; the GPU holds 79.19 GiB): try a smaller --batch-size"
    ]


def test_evaluate_config_and_printed_table(calls):
    result = _invoke("evaluate")
    assert calls == [("evaluate", EvaluateConfig())]
    assert "CIDEr-D" in result.stdout and "1.2500" in result.stdout and "perplexity" in result.stdout
    result = _invoke(
        "evaluate", "--model", "m.pt", "--store", "s.h5", "--split", "val", "--beam-size", "5", "--out", "x.json",
        "--device", "cpu", "--no-meteor",
    )  # fmt: skip
    expected = EvaluateConfig(
        model=Path("m.pt"), store=Path("s.h5"), split="val", beam_size=5, out=Path("x.json"), device="cpu", meteor=False
    )
    assert calls[-1] == ("evaluate", expected)
    assert "wrote x.json" in result.stdout
    _invoke("evaluate", "--meteor")
    assert calls[-1] == ("evaluate", EvaluateConfig(meteor=True))


def test_generate_config_and_one_printed_line_per_caption(calls):
    result = _invoke("generate", "--image", "a.jpg")
    assert calls == [("generate", GenerateConfig(images=[Path("a.jpg")]))]
    assert result.stdout.splitlines() == ["a.jpg: a dog .", "b.jpg: a cat ."]
    result = _invoke(
        "generate", "--image", "a.jpg", "--image", "photos", "--model", "m.pt", "--beam-size", "1", "--attention",
        "att.png", "--device", "cpu", "--json",
    )  # fmt: skip
    expected = GenerateConfig(
        images=[Path("a.jpg"), Path("photos")], model=Path("m.pt"), beam_size=1, attention="att.png", device="cpu"
    )
    assert calls[-1] == ("generate", expected)
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"image": "a.jpg", "caption": "a dog ."},
        {"image": "b.jpg", "caption": "a cat ."},
    ]


def test_demo_config(calls):
    _invoke("demo")
    assert calls == [("demo", DemoConfig())]
    _invoke("demo", "--out", "d", "--images", "40", "--epochs", "2")
    assert calls[-1] == ("demo", DemoConfig(out=Path("d"), images=40, epochs=2))
    for flag, finetune in (("--finetune", True), ("--frozen", False)):
        _invoke("demo", flag)
        assert calls[-1] == ("demo", DemoConfig(finetune=finetune))


def test_extract_config(calls):
    _invoke("extract", "--images", "imgs")
    assert calls == [("extract", ExtractConfig(images=Path("imgs")))]
    _invoke(
        "extract", "--images", "imgs", "--captions", "c.txt", "--store", "s.h5", "--weights", "none", "--batch-size",
        "8", "--workers", "2", "--device", "cpu", "--dtype", "float32", "--overwrite", "--layer", "layer3",
        "--decode", "cpu",
    )  # fmt: skip
    expected = ExtractConfig(
        images=Path("imgs"), captions=Path("c.txt"), store=Path("s.h5"), weights="none", batch_size=8, workers=2,
        device="cpu", dtype="float32", overwrite=True, layer="layer3", decode="cpu",
    )  # fmt: skip
    assert calls[-1] == ("extract", expected)
    assert ExtractConfig(images=Path("imgs")).layer == "layer4"
    assert CliRunner().invoke(app, ["extract", "--images", "imgs", "--layer", "layer5"]).exit_code == 2
    assert ExtractConfig(images=Path("imgs")).decode == "auto"
    assert CliRunner().invoke(app, ["extract", "--images", "imgs", "--decode", "nvjpeg"]).exit_code == 2


def test_extract_prints_the_summary_it_returns(calls, monkeypatch):
    """The library returns extract's summary; the CLI prints its `done:` line (none when there was nothing to do,
    which the library said itself)."""
    import pipeline.extract

    done = "done: 4 images written, 1 skipped, 24 captions, 1.50 GiB at s.h5, 3 this run in 2.0s\n"
    assert _invoke("extract", "--images", "imgs").stdout == done
    unreadable = EXTRACT_SUMMARY | {"images_unreadable": 2, "processes": 2}
    monkeypatch.setattr(pipeline.extract, "extract", lambda cfg: unreadable)
    assert _invoke("extract", "--images", "imgs").stdout == (
        "done: 4 images written, 3 skipped (1 undecodable, 2 unreadable: rerun to retry the unreadable ones), "
        "24 captions, 1.50 GiB at s.h5, 3 this run by 2 processes in 2.0s\n"
    )
    monkeypatch.setattr(pipeline.extract, "extract", lambda cfg: EXTRACT_SUMMARY | {"nothing_to_do": True})
    assert _invoke("extract", "--images", "imgs").stdout == ""


def test_serve_config(calls):
    _invoke("serve")
    assert calls == [("serve", ServeConfig())]
    _invoke(
        "serve", "--model", "m.pt", "--host", "0.0.0.0", "--port", "9000", "--device", "cpu", "--max-upload-mb", "2"
    )  # fmt: skip
    expected = ServeConfig(model=Path("m.pt"), host="0.0.0.0", port=9000, device="cpu", max_upload_mb=2.0)
    assert calls[-1] == ("serve", expected)


# -- drift: every option's default and choices are the library's ------------------------------------------------


def _plain(value: object) -> object:
    """A default as the config holds it: an enum's value, a path's text."""
    value = value.value if isinstance(value, enum.Enum) else value
    return str(value) if isinstance(value, Path) else value


def _choices(option) -> set[str] | None:
    """The values a choice option takes (click's Choice, or the Enum typer builds it from), None for others."""
    choice = getattr(getattr(option, "type", None), "choices", None)  # click (typer before it vendored click)
    if choice is not None:
        return set(choice)
    annotation = getattr(getattr(option, "type_descriptor", None), "annotation", None)  # typer's own click
    return {m.value for m in annotation} if isinstance(annotation, type) and issubclass(annotation, enum.Enum) else None


def _library_choices(command: str) -> dict[str, set[str]]:
    """What the library accepts for each option that the CLI offers as a choice."""
    from pipeline.config import DECODE_MODES, FEATURE_NORMS, FINETUNE_LAYERS, LR_SCHEDULES, SCST_BASELINES
    from pipeline.encoder import ENCODER_NAMES
    from pipeline.store import DTYPES

    return {
        "extract": {"dtype": set(DTYPES), "layer": set(ENCODER_NAMES), "decode": set(DECODE_MODES)},
        "fit": {
            "feature_norm": set(FEATURE_NORMS),
            "finetune": set(FINETUNE_LAYERS),
            "scst_baseline": set(SCST_BASELINES),
            "lr_schedule": set(LR_SCHEDULES),
        },
        "evaluate": {"split": set(EVAL_SPLITS)},
    }.get(command, {})


DRIFT = [  # command, its config, options that are no field of it ({option: field} or None: the CLI's own)
    ("extract", ExtractConfig, {}),
    ("fit", TrainConfig, {}),
    ("evaluate", EvaluateConfig, {}),
    ("generate", GenerateConfig, {"image": "images", "json": None}),
    ("serve", ServeConfig, {}),
    ("demo", DemoConfig, {}),
]


@pytest.mark.parametrize(("command", "config", "renamed"), DRIFT, ids=[d[0] for d in DRIFT])
def test_no_default_nor_choice_drifts_from_the_library(command, config, renamed):
    """Walk the command's options: each is a field of the command's config with the same default (a required
    option: a field without one), and each choice list is what the library accepts."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    options = [p for p in typer.main.get_command(app).commands[command].params if p.param_type_name == "option"]
    assert options
    for option in options:
        name = renamed.get(option.name, option.name)
        if name is None:
            continue
        assert name in fields, f"{command} --{option.name}: {config.__name__} has no field {name}"
        field = fields[name]
        if option.required:
            assert field.default is dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, name
        else:
            assert _plain(option.default) == _plain(field.default), f"{command} --{option.name}"
    choices = {p.name: _choices(p) for p in options if _choices(p) is not None}
    assert choices == _library_choices(command)


def test_the_library_refuses_the_train_split_as_the_cli_does():
    from pipeline.errors import UserError
    from pipeline.evaluate import evaluate

    with pytest.raises(UserError, match="--split must be test or val, not 'train'"):
        evaluate(EvaluateConfig(split="train"))
    assert CliRunner().invoke(app, ["evaluate", "--split", "train"]).exit_code == 2


def test_demo_trains_with_fits_defaults():
    assert (DemoConfig.encoder_lr, DemoConfig.finetune_after) == (TrainConfig.encoder_lr, TrainConfig.finetune_after)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_threads_wait_passively_unless_the_user_says_otherwise(given, expected, subprocess_env):
    """cli.py sets OMP_WAIT_POLICY before any command imports torch (docs/speed.md: spinning threads stall on
    shared cores); a value in the environment is the user's and is kept."""
    import subprocess
    import sys

    from helpers_store import ROOT

    env = {k: v for k, v in subprocess_env.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": given} if given else {}
    )
    code = "import os, sys, cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [expected, "False"], out.stdout + out.stderr
