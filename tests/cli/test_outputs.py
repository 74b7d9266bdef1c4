"""evaluate, generate, metrics and demo, end to end on a tiny generated dataset (random-init encoder)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli
from pipeline import metrics
from pipeline.demo import DemoConfig, demo, make_dataset
from pipeline.extract import ExtractConfig, extract
from pipeline.train import TrainConfig, fit

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "photos"
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 40-image generated dataset, its store (--weights none) and a model trained for 2 epochs."""
    root = tmp_path_factory.mktemp("trained")
    captions = make_dataset(root / "data", 40, size=96, seed=1)
    store = root / "features.h5"
    extract(
        ExtractConfig(
            images=root / "data", captions=captions, store=store, weights="none", workers=0, device="cpu", batch_size=16
        )
    )
    fit(
        TrainConfig(
            store=str(store), out=str(root / "run"), epochs=2, device="cpu", min_word_count=1, val_decode_images=4
        )
    )
    return {"root": root, "store": store, "model": root / "run" / "model.pt", "images": root / "data" / "images"}


def _invoke(args: list[str]):
    return runner.invoke(cli.app, [str(a) for a in args])


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


# -- metrics -------------------------------------------------------------------------------------------

CANDIDATES = ["a dog runs on the grass .", "two men are standing in a yard", "a red car"]
REFERENCES = [
    ["A dog is running on the grass.", "A brown dog runs across a lawn .", "The dog runs outside."],
    ["Two men stand in a yard .", "Two guys are standing in the garden.", "Men standing outside"],
    ["A red car parked on the street.", "A small red car .", "A car that is red."],
]


def _reference_scores(use_ptb: bool) -> dict:
    """pycocoevalcap called directly, the way its COCOEvalCap does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [{"caption": c}] for i, c in enumerate(CANDIDATES)}
    if use_ptb:
        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        gts = {k: [metrics.simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res = {k: [metrics.simple_tokenize(c["caption"]) for c in v] for k, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"BLEU-{i + 1}": b for i, b in enumerate(bleu)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    if use_ptb:
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    return out


@pytest.mark.skipif(
    not metrics.java_available(),
    reason="no working Java: METEOR and the PTB tokenizer run on it (Debian: apt-get install default-jre-headless)",
)
def test_scores_equal_pycocoevalcap_with_java():
    ours = metrics.score(CANDIDATES, REFERENCES)
    assert ours["tokenizer"] == "ptb"
    expected = _reference_scores(use_ptb=True)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["BLEU-1"] <= 1 and ours["CIDEr-D"] > 0


def test_scores_without_java_leave_meteor_out_and_say_so(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    ours = metrics.score(CANDIDATES, REFERENCES)
    assert "METEOR" not in ours
    assert "not PTB" in ours["tokenizer"]
    expected = _reference_scores(use_ptb=False)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_simple_tokenizer_drops_ptb_punctuation():
    assert metrics.simple_tokenize("A dog, running... Fast!") == "a dog running fast"


def test_scores_compare_captions_in_nfc(monkeypatch):
    """A reference stored in NFD (`cafe` + U+0301) is the same word as the model's NFC `café`."""
    import unicodedata

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    refs = [[unicodedata.normalize("NFD", "un café à côté de la gare")]]
    ours = metrics.score(["un café à côté de la gare"], refs)
    assert ours["BLEU-4"] == pytest.approx(1.0)
    assert metrics.simple_tokenize(refs[0][0]) == "un café à côté de la gare"


def test_identical_captions_score_higher_than_unrelated(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    refs = [["a dog runs on the grass", "a dog running on grass"], ["a red car on a street", "a red car"]]
    good = metrics.score(["a dog runs on the grass", "a red car on a street"], refs)
    bad = metrics.score(["a red car on a street", "a dog runs on the grass"], refs)
    assert good["CIDEr-D"] > bad["CIDEr-D"] + 1 and good["BLEU-4"] > bad["BLEU-4"]


# -- evaluate ------------------------------------------------------------------------------------------


def test_evaluate_writes_contract_json(trained, tmp_path):
    out = tmp_path / "scores.json"
    result = _invoke(
        [
            "evaluate",
            "--model",
            trained["model"],
            "--store",
            trained["store"],
            "--out",
            out,
            "--device",
            "cpu",
            "--no-meteor",
            "--beam-size",
            "2",
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert 0.0 <= data["metrics"][name] <= 10.0
    assert "METEOR" not in data["metrics"]  # --no-meteor: Java never runs
    from pipeline.store import FeatureStore

    test_images = {FeatureStore(trained["store"]).images[r] for r in FeatureStore(trained["store"]).split_rows("test")}
    assert {c["image"] for c in data["captions"]} == test_images  # each test image decoded once
    assert len(data["captions"]) == len(test_images)
    for c in data["captions"]:
        assert len(c["references"]) == 5 and isinstance(c["caption"], str)
        assert "<" not in c["caption"]  # no special tokens
    assert math.isfinite(data["details"]["loss"]) and data["details"]["perplexity"] > 1


def test_evaluate_meteor_asked_without_java_is_an_error(trained, monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    import pipeline.evaluate as ev

    monkeypatch.setattr(ev, "java_available", lambda: False)
    result = _invoke(["evaluate", "--model", trained["model"], "--store", trained["store"], "--meteor"])
    assert result.exit_code == 1
    assert "Java" in _error_line(result)


def test_evaluate_refuses_store_made_with_other_weights(trained, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(trained["store"], other)
    import h5py

    with h5py.File(other, "r+") as f:
        f.attrs["weights"] = "IMAGENET1K_V1"
    result = _invoke(["evaluate", "--model", trained["model"], "--store", other])
    assert result.exit_code == 1
    assert "weights" in _error_line(result)


def test_evaluate_missing_model_is_an_error(trained, tmp_path):
    result = _invoke(["evaluate", "--model", tmp_path / "nope.pt", "--store", trained["store"]])
    assert result.exit_code == 1
    assert "nope.pt" in _error_line(result)


# -- generate ------------------------------------------------------------------------------------------


def test_generate_folder_json_lines(trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(trained["images"].glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image")  # ignored: only image files are taken from a folder
    result = _invoke(["generate", "--image", folder, "--model", trained["model"], "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(d["image"]).name for d in lines) == sorted(p.name for p in folder.glob("*.jpg"))
    assert all(set(d) == {"image", "caption"} and d["caption"] and "<" not in d["caption"] for d in lines)


@pytest.mark.skipif(
    not PHOTOS.is_dir(), reason="needs the real photos of ../shared/data/photos, not next to this checkout"
)
def test_generate_real_photo_with_attention_figure(trained, tmp_path):
    photo = sorted(PHOTOS.glob("*.jpg"))[0]
    fig = tmp_path / "att.png"
    result = _invoke(
        [
            "generate",
            "--image",
            photo,
            "--model",
            trained["model"],
            "--attention",
            fig,
            "--beam-size",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    caption, figure = result.stdout.strip().splitlines()[-1].split(": ", 1)[1].rsplit("  (attention figure: ", 1)
    assert figure == f"{fig})"
    words = caption.replace(".", " .").replace(",", " ,").split()
    panels = 1 + len(words)
    cols, rows = min(panels, 5), math.ceil(panels / 5)
    with Image.open(fig) as img:  # figsize (2.4 cols, 2.6 rows) inches at 80 dpi
        assert img.size == (round(2.4 * cols * 80), round(2.6 * rows * 80))


def test_generate_several_images_one_figure_each_and_bad_one_reported(trained, tmp_path):
    good = sorted(trained["images"].glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    fig = tmp_path / "figs" / "att.png"
    result = _invoke(
        [
            "generate",
            "--image",
            good[0],
            "--image",
            bad,
            "--image",
            good[1],
            "--model",
            trained["model"],
            "--attention",
            fig,
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.stderr
    captioned = [line for line in result.stdout.splitlines() if ": " in line]
    assert len(captioned) == 2
    assert sorted(p.name for p in fig.parent.iterdir()) == sorted(f"att_{p.stem}.png" for p in good)


def test_generate_single_unreadable_or_missing_image_is_an_error(trained, tmp_path):
    bad = tmp_path / "zero.jpg"
    bad.write_bytes(b"")
    for path in (bad, tmp_path / "missing.jpg"):
        result = _invoke(["generate", "--image", path, "--model", trained["model"], "--device", "cpu"])
        assert result.exit_code == 1
        assert path.name in _error_line(result)


def test_generate_refuses_when_encoder_weights_file_moved(tmp_path):
    """A model trained on features of a weights file needs that same file to caption new photos."""
    from torchvision.models import resnet50

    torch.manual_seed(3)
    weights = tmp_path / "w.pt"
    torch.save(resnet50(weights=None).state_dict(), weights)
    captions = make_dataset(tmp_path / "data", 20, size=64, seed=2)
    store = tmp_path / "f.h5"
    extract(
        ExtractConfig(
            images=tmp_path / "data",
            captions=captions,
            store=store,
            weights=str(weights),
            workers=0,
            device="cpu",
            batch_size=20,
        )
    )
    fit(
        TrainConfig(
            store=str(store), out=str(tmp_path / "run"), epochs=1, device="cpu", min_word_count=1, val_decode_images=0
        )
    )
    image = sorted((tmp_path / "data" / "images").glob("*.jpg"))[0]
    model = tmp_path / "run" / "model.pt"
    ok = _invoke(["generate", "--image", image, "--model", model, "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    weights.rename(tmp_path / "moved.pt")
    result = _invoke(["generate", "--image", image, "--model", model, "--device", "cpu"])
    assert result.exit_code == 1
    assert "w.pt" in _error_line(result)


def test_generate_matches_the_store_features(trained):
    """generate's encoder path equals extract's: the same image gives the same caption from either."""
    from pipeline.captioner import Captioner
    from pipeline.decode import beam_search
    from pipeline.store import FeatureStore
    from pipeline.transform import load_uint8

    cap = Captioner.load(trained["model"], torch.device("cpu"))
    store = FeatureStore(trained["store"])
    row = int(store.split_rows("test")[0])
    pixels = load_uint8(trained["root"] / "data" / store.images[row], cap.transform).unsqueeze(0)
    from_image = cap.caption(pixels, beam_size=2)[0]
    from_store = beam_search(cap.decoder, torch.from_numpy(store.features[row : row + 1].copy()), 2, cap.max_steps)[0]
    assert from_image.tokens == from_store.tokens


# -- demo ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_at_reduced_size(tmp_path, caplog):
    out = tmp_path / "demo"
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = demo(DemoConfig(out=out, images=40, epochs=1, size=96, weights="none"))
    assert set(result) >= {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert (out / "attention.png").is_file() and (out / "scores.json").is_file()
    assert (out / "model.pt").is_file() and (out / "metrics.jsonl").is_file()
    reported = caplog.text  # the demo's report, through logging (the CLI prints it)
    assert "chance" in reported and "reference" in reported and "one glimpse" in reported
