"""Fine-tuning ResNet50's layer4 from a layer3 store (issue 10): the encoder split, the store's `layer`, fit
--finetune (checkpoints, exact resume, the decoder-only epochs), the frozen layer4 path, the refusals, and
generate against evaluate on real (generated) images.

Synthetic stores (tests/helpers_store.py) and tiny images keep this module to a few tens of seconds on 2 cores:
the stored layer3 rows are 14x14x1024 whatever the image size, the decoder is the "tiny" preset, and the
seeded random ResNet50 (`--weights none`) needs no download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from assertions import assert_same
from helpers_store import make_store
from test_fit import _assert_same_weights, _cfg, _error_line, _fit_args, _load, _metrics

from pipeline import checkpoint
from pipeline.encoder import FEATURE_SHAPES, FrozenBatchNorm2d, build_layer4, build_resnet50, split_resnet50
from pipeline.model import CaptionModel, Decoder, DecoderConfig
from pipeline.store import FeatureStore, mismatches
from pipeline.train import fit, make_optimizer

LAYER4_CONV_PARAMETERS = 14_942_208  # the convolutions of torchvision's resnet50.layer4: what --finetune trains
FT = {"finetune": "layer4", "encoder_lr": 1e-3}


@pytest.fixture(scope="module")
def seeded():
    """The seeded random resnet50 (`--weights none`) and its (stem..layer3, layer4) split."""
    model, _ = build_resnet50("none")
    trunk, head = split_resnet50(model)
    return model, trunk, head


# -- the encoder split -----------------------------------------------------------------------------------------


def test_split_is_the_same_network_and_only_the_convolutions_train(seeded):
    model, trunk, head = seeded
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = torch.nn.Sequential(*list(model.children())[:-2])(x)
        assert torch.allclose(head(trunk(x)), whole, rtol=1e-4, atol=1e-4)
    # frozen BatchNorm: statistics and affine parameters are buffers; the trained parameters are the convolutions
    assert all(not isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in head.modules()) == 10
    assert sum(p.numel() for p in head.parameters()) == LAYER4_CONV_PARAMETERS
    assert all(p.ndim == 4 for p in head.parameters())
    assert all(not p.requires_grad for p in trunk.parameters())
    # build_layer4("none") is the layer4 of the same seeded model that extract's build_encoder("none") uses
    built, info = build_layer4("none")
    assert info.name == "none"
    full = {k: v for k, v in model.layer4.state_dict().items() if not k.endswith("num_batches_tracked")}
    _assert_same_weights(built.state_dict(), full)


def test_caption_model_gradients_reach_layer4_only_when_it_trains(seeded):
    _, _, head = seeded
    decoder = Decoder(DecoderConfig.preset("tiny", vocab_size=11, feature_scale=0.03))
    model = CaptionModel(decoder, split_resnet50(seeded[0])[1], train_encoder=True)
    stored = torch.rand(2, 8, 8, 1024, dtype=torch.float16)  # float16 layer3 rows (8x8 here, 14x14 in a store)
    tokens = torch.randint(4, 11, (2, 3, 5))
    logits, alphas = model(stored, tokens)
    assert logits.shape == (2, 3, 5, 11) and alphas.shape == (2, 3, 5, 16)  # layer4 halves the grid: 4x4 cells
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    model.train_encoder = False  # a frozen layer4, or the epochs before --finetune-after
    model(stored, tokens)[0].square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    groups = make_optimizer(model, 1e-3, 1e-4).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert sum(p.numel() for p in groups[1]["params"]) == LAYER4_CONV_PARAMETERS


# -- the store's layer ----------------------------------------------------------------------------------------


def test_store_without_a_layer_attribute_reads_as_layer4(tmp_path):
    """Stores made before layer3 stores existed have no `layer`: they are layer4 stores, and resume as such."""
    from pipeline.encoder import WeightsInfo
    from pipeline.extract import provenance
    from pipeline.transform import TransformConfig

    store = make_store(tmp_path / "old.h5", n_images=4)
    with h5py.File(store.path, "r+") as f:
        del f.attrs["layer"]
    opened = FeatureStore(store.path)
    assert opened.layer == "layer4" and opened.identity()["layer"] == "layer4"
    asked = provenance(WeightsInfo("none", "").to_dict(), TransformConfig(), "float16", "layer4")
    assert mismatches(opened.attrs, asked) == []
    asked3 = provenance(WeightsInfo("none", "").to_dict(), TransformConfig(), "float16", "layer3")
    assert any(m.startswith("layer ") for m in mismatches(opened.attrs, asked3))
    l3 = FeatureStore(make_store(tmp_path / "l3.h5", n_images=4, layer="layer3").path)
    assert l3.layer == "layer3" and l3.features.shape == (4, 14, 14, 1024)


def test_extract_layer3_resumes_and_refuses_the_other_layer(tmp_path, make_flickr8k, cli, monkeypatch):
    """With a stand-in trunk (the store, not the features, is tested): a layer3 store has 14x14x1024 rows and
    records its layer; rerunning completes nothing more; asking for layer4 on it is refused as made differently."""
    from helpers_extract import fake_extract

    monkeypatch.setattr("pipeline.extract.extract", fake_extract())
    images, store = make_flickr8k(tmp_path / "imgs", 3), tmp_path / "s.h5"
    args = ["extract", "--images", images, "--store", store, "--weights", "none", "--device", "cpu", "--workers", "0"]
    cli(*args, "--layer", "layer3")
    opened = FeatureStore(store)
    assert opened.layer == "layer3" and opened.features.shape == (3, 14, 14, 1024) and opened.complete
    assert "nothing to do" in cli(*args, "--layer", "layer3").stdout
    line = _error_line(cli(*args, code=1))  # the default, layer4
    assert "made differently" in line and "layer 'layer3' (store) vs 'layer4' (asked)" in line


# -- fit --finetune ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def l3store(tmp_path_factory):
    """10 synthetic images (7 train / 3 val) in a float16 layer3 store made with `--weights none`."""
    return make_store(tmp_path_factory.mktemp("l3") / "layer3.h5", n_images=10, layer="layer3")


@pytest.fixture(scope="module")
def finetuned(l3store, tmp_path_factory) -> Path:
    """OUT of `fit --finetune layer4 --epochs 2 --finetune-after 1 --captions-per-image 2` (tiny decoder)."""
    out = tmp_path_factory.mktemp("ft") / "out"
    fit(_cfg(l3store.path, out, epochs=2, finetune_after=1, captions_per_image=2, batch_size=4, **FT))
    return out


def test_finetune_checkpoints_hold_the_trained_layer4(finetuned, seeded, l3store):
    last, best = _load(finetuned / "last.pt"), _load(finetuned / "model.pt")  # weights_only loads
    initial = seeded[2].state_dict()
    for ckpt in (last, best):
        assert ckpt["finetune"] == checkpoint.FINETUNE
        assert ckpt["train_config"]["finetune"] == "layer4" and ckpt["store"]["layer"] == "layer3"
        assert ckpt["layer4"].keys() == initial.keys()
    trained = last["layer4"]
    convs = [k for k in initial if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert all(not torch.equal(trained[k], initial[k]) for k in convs)  # the convolutions trained
    frozen_bn = [k for k in initial if ".bn" in k or "downsample.1" in k]
    assert len(frozen_bn) == 40 and all(torch.equal(trained[k], initial[k]) for k in frozen_bn)
    metrics = _metrics(finetuned)
    assert [m["encoder_trained"] for m in metrics] == [False, True]  # --finetune-after 1
    assert all(m["encoder_lr"] == FT["encoder_lr"] for m in metrics)
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == [1e-2, FT["encoder_lr"]]
    # the decoder reads layer4's output: its input statistics are layer4's on the training rows, not layer3's
    train = l3store.features[[i for i, s in enumerate(l3store.splits) if s == "train"]].astype(np.float32)
    with torch.no_grad():
        out = seeded[2](torch.from_numpy(train).permute(0, 3, 1, 2)).double()  # (n, 2048, 7, 7)
    mean = out.permute(0, 2, 3, 1).reshape(-1, 2048).mean(0)
    torch.testing.assert_close(last["model"]["feature_mean"].double(), mean, rtol=1e-4, atol=1e-5)


def test_finetune_resume_is_exact(l3store, finetuned, tmp_path):
    """fit --epochs 2 then --epochs 3 --resume == fit --epochs 3: the layer4 weights, its Adam state, all of it."""
    full = tmp_path / "full"
    fit(_cfg(l3store.path, full, epochs=3, finetune_after=1, captions_per_image=2, batch_size=4, **FT))
    split = tmp_path / "split"
    shutil.copytree(finetuned, split)  # 2 epochs of the same settings
    # resumed: the saved settings win over these
    fit(_cfg(l3store.path, split, epochs=3, resume=True, finetune=None, encoder_lr=0.5, finetune_after=0))
    a, b = _load(full / "last.pt"), _load(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    _assert_same_weights(a["model"], b["model"])
    _assert_same_weights(a["layer4"], b["layer4"])
    for key in ("optimizer", "scheduler", "rng", "best", "finetune"):
        assert_same(a[key], b[key], key)
    assert [m["train_loss"] for m in _metrics(full)] == [m["train_loss"] for m in _metrics(split)]


def test_layer3_store_without_finetune_runs_a_frozen_layer4(l3store, seeded, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(*_fit_args(l3store.path, out, "--epochs", "1"))
    assert "slower than training from a layer4 store" in result.stdout
    last = _load(out / "last.pt")
    assert "layer4" not in last and "finetune" not in last  # its layer4 is the recorded weights'
    assert len(last["optimizer"]["param_groups"]) == 1
    model, _ = checkpoint.build_model(checkpoint.load(out / "model.pt"), out / "model.pt", "layer3")
    _assert_same_weights(model.encoder.state_dict(), seeded[2].state_dict())
    # `--resume --finetune layer4` used to continue frozen, then say "--finetune is not given"
    before = (out / "last.pt").read_bytes()
    result = cli(*_fit_args(l3store.path, out, "--epochs", "2", "--resume", "--finetune", "layer4"), code=1)
    assert "--finetune layer4 (last.pt: none)" in _error_line(result)
    assert (out / "last.pt").read_bytes() == before


def test_finetune_on_a_layer4_store_is_refused_with_how_to_make_a_layer3_store(tmp_path, cli):
    l4 = make_store(tmp_path / "l4.h5", n_images=6)
    result = cli(*_fit_args(l4.path, tmp_path / "out", "--epochs", "1", "--finetune", "layer4"), code=1)
    line = _error_line(result)
    assert "layer3 store" in line and "extract --layer layer3" in line
    assert not (tmp_path / "out").exists()
    result = cli(*_fit_args(l4.path, tmp_path / "out", "--epochs", "1", "--finetune-after", "2"), code=1)
    assert "--finetune layer4" in _error_line(result)


def test_evaluate_refuses_a_finetuned_model_on_a_layer4_store(finetuned, tmp_path, cli):
    l4 = make_store(tmp_path / "l4.h5", n_images=10)  # same images, captions and weights, layer4 features
    result = cli("evaluate", "--model", finetuned / "model.pt", "--store", l4.path, "--no-meteor", code=1)
    line = _error_line(result)
    assert "fine-tuned" in line and "layer3" in line and "extract --layer layer3" in line


# -- real images: extract --layer layer3, fit --finetune, evaluate, generate -----------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, cli) -> dict:
    """12 generated pictures (6 train, 2 val, 4 test) in a float32 layer3 store (`--weights none`), and a model
    fine-tuned for 2 epochs on it."""
    from pipeline.demo import make_dataset

    root = tmp_path_factory.mktemp("pictures")
    captions = make_dataset(root / "data", 12, size=48, seed=3)
    data = json.loads(captions.read_text(encoding="utf-8"))
    for i, entry in enumerate(data["images"]):
        entry["split"] = "train" if i < 6 else "val" if i < 8 else "test"
    captions.write_text(json.dumps(data), encoding="utf-8")
    store = root / "layer3.h5"
    cli(
        "extract", "--images", root / "data", "--captions", captions, "--store", store, "--weights", "none",
        "--dtype", "float32", "--device", "cpu", "--workers", "0", "--batch-size", "12", "--layer", "layer3",
    )  # fmt: skip
    out = root / "run"
    cli(
        "fit", "--store", store, "--out", out, "--finetune", "layer4", "--epochs", "2", "--decoder", "tiny",
        "--device", "cpu", "--min-word-count", "1", "--val-decode-images", "0", "--batch-size", "4", "--lr", "0.01",
        "--captions-per-image", "3",
    )  # fmt: skip
    return {"root": root, "images": root / "data", "store": store, "model": out / "model.pt"}


def test_layer3_store_holds_the_stem_to_layer3_output(pictures, seeded):
    from pipeline.transform import load_uint8, normalize

    store = FeatureStore(pictures["store"])
    assert store.features.shape == (12, *FEATURE_SHAPES["layer3"]) == (12, 14, 14, 1024)
    assert store.features.dtype == np.float32
    assert store.attrs["layer"] == "layer3" and "layer3" in store.attrs["encoder"]
    x = normalize(load_uint8(pictures["images"] / store.images[0]).unsqueeze(0))
    with torch.no_grad():
        expected = seeded[1](x).permute(0, 2, 3, 1)[0].numpy()  # (14, 14, 1024)
    np.testing.assert_allclose(store.features[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_generate_equals_evaluate_on_the_layer3_store(pictures, tmp_path, cli):
    """generate runs stem..layer3 from the recorded weights and layer4 from the checkpoint; evaluate reads the
    float32 layer3 rows and runs the same layer4: the same caption for every test image."""
    scores = tmp_path / "scores.json"
    store = pictures["store"]
    cli("evaluate", "--model", pictures["model"], "--store", store, "--out", scores, "--no-meteor", "--device", "cpu")
    evaluated = {c["image"]: c["caption"] for c in json.loads(scores.read_text())["captions"]}
    assert len(evaluated) == 4
    paths = [pictures["images"] / name for name in evaluated]
    args = ["generate", "--model", pictures["model"], "--json", "--device", "cpu"]
    result = cli(*args, *[a for p in paths for a in ("--image", p)])
    generated = {Path(d["image"]).relative_to(pictures["images"]).as_posix(): d["caption"]
                 for d in map(json.loads, result.stdout.splitlines())}  # fmt: skip
    assert generated == evaluated


def test_frozen_models_read_either_store(pictures, tmp_path, cli):
    """A model that did not fine-tune layer4 reads a layer4 store, or a layer3 store with the same weights'
    layer4 run on it; a store of other weights is still refused."""
    l4 = make_store(tmp_path / "l4.h5", n_images=12, dtype="float32")  # the same provenance as the layer4 extract's
    out = tmp_path / "l4run"
    cli(*_fit_args(l4.path, out, "--epochs", "1"))
    for store in (l4.path, pictures["store"]):
        result = cli("evaluate", "--model", out / "model.pt", "--store", store, "--no-meteor", "--beam-size", "1")
        assert "CIDEr-D" in result.stdout
    other = tmp_path / "other.h5"
    shutil.copy(pictures["store"], other)
    with h5py.File(other, "r+") as f:
        f.attrs["weights_sha256"] = "ab" * 32
    result = cli("evaluate", "--model", pictures["model"], "--store", other, "--no-meteor", code=1)
    assert "made differently" in _error_line(result)


# -- the demo's attention measure -------------------------------------------------------------------------------


def test_object_mask_and_attention_on_the_object():
    import random

    from pipeline.demo import attention_on_object, draw_object_sample, draw_sample, object_mask

    img, attrs = draw_object_sample(random.Random(4), 70)
    assert (img.tobytes(), attrs["colour"], attrs["shape"], attrs["place"]) == (
        (lambda s: (s[0].tobytes(), *s[1:]))(draw_sample(random.Random(4), 70))
    )  # the same picture as before the geometry was recorded
    mask = object_mask(attrs, 70)
    assert mask.shape == (49,) and 0.03 < mask.mean() < 0.25 and mask.max() > 0.9
    on = mask / mask.sum()  # all attention on the object, in proportion to its cover
    even = np.full(49, 1 / 49)
    words = [attrs["colour"], attrs["shape"], "on", "the", attrs["place"]]
    result = attention_on_object([(words, np.stack([on, even, even, even, even]), mask)])
    assert result["colour_steps"] == result["shape_steps"] == 1
    assert result["shape_ratio"] == pytest.approx(1.0)  # spread evenly: the object's share, 1x
    assert result["colour_mass"] == pytest.approx(float(on @ mask)) and result["colour_ratio"] > 3
