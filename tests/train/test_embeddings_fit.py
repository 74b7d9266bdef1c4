"""`fit --embeddings random|word2vec|FILE [--freeze-embeddings]` through the command line: the vectors reach the
model, the checkpoint's config records them, resume keeps frozen vectors frozen, evaluate reads such a model,
and every bad input is one `error:` line with exit status 1.

The tiny decoder preset (embedding size 16) and the 20-image synthetic store, as in test_fit.py.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_store import make_store
from helpers_vectors import needs_gensim, write_vectors

from pipeline.checkpoint import build_decoder
from pipeline.model import DECODER_PRESETS

DIM = DECODER_PRESETS["tiny"]["embed_dim"]


@pytest.fixture
def tiny():
    """The tests train the named tiny decoder (`--decoder tiny`, in `_fit`)."""


@pytest.fixture(scope="module")
def store20(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.h5", n_images=20)


@pytest.fixture(scope="module")
def vocab_words(store20) -> list[str]:
    from pipeline.train import TrainConfig, prepare

    run = prepare(TrainConfig(store=str(store20.path), device="cpu", min_word_count=1))
    return run.vocab.to_list()


@pytest.fixture
def vectors_file(tmp_path, vocab_words) -> tuple[Path, dict[str, np.ndarray]]:
    """A word2vec binary file with 16-d vectors for all vocabulary words but two, and one word not in it."""
    words = [w for w in vocab_words[4:] if w not in ("star", "yellow")] + ["zebra"]
    vectors = np.random.default_rng(3).normal(0, 0.5, (len(words), DIM)).astype(np.float32)
    path = write_vectors(tmp_path / "vectors.bin", words, vectors, "binary")
    return path, dict(zip(words, vectors, strict=True))


def _fit(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *("--store", store, "--out", out, "--device", "cpu", "--batch-size", "7", "--lr", "0.01"),
        *("--min-word-count", "1", "--val-decode-images", "0", "--epochs", "1", "--decoder", "tiny"),
        *extra,
    ]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@needs_gensim
def test_frozen_file_vectors_are_in_the_checkpoints_and_resume_keeps_them_frozen(
    store20, vectors_file, tmp_path, tiny, cli
):
    path, vectors = vectors_file
    out = tmp_path / "run"
    result = cli(*_fit(store20.path, out, "--embeddings", path, "--freeze-embeddings"))
    words = len(vectors) - 1  # zebra is not in the vocabulary
    assert f"{words} of {words + 2} vocabulary words covered" in result.stdout
    assert "2 start random (" in result.stdout
    first = _load(out / "last.pt")
    cfg = first["train_config"]
    assert cfg["embeddings"] == str(path) and cfg["freeze_embeddings"] is True
    itos = first["vocab"]
    for name in ("last.pt", "model.pt"):
        weight = _load(out / name)["model"]["embedding.weight"]
        for word, vector in vectors.items():
            if word in itos:
                np.testing.assert_array_equal(weight[itos.index(word)].numpy(), vector)
    # the fused Adam holds no state for the frozen parameter, and the rest trained
    buffers = {"feature_mean", "feature_inv_std", "grid_mean"}  # the input statistics: state, not parameters
    n_params = len(first["model"].keys() - buffers)
    assert len(first["optimizer"]["state"]) == n_params - 1

    cli(*_fit(store20.path, out, "--epochs", "2", "--resume"))  # no --freeze-embeddings: the checkpoint's wins
    second = _load(out / "last.pt")
    assert second["epoch"] == 2 and second["train_config"]["freeze_embeddings"] is True
    assert second["train_config"]["embeddings"] == str(path)
    assert torch.equal(second["model"]["embedding.weight"], first["model"]["embedding.weight"])
    assert not torch.equal(second["model"]["gates.weight"], first["model"]["gates.weight"])


@needs_gensim
def test_file_vectors_train_by_default(store20, vectors_file, tmp_path, tiny, cli):
    path, vectors = vectors_file
    out = tmp_path / "run"
    cli(*_fit(store20.path, out, "--embeddings", path))
    ckpt = _load(out / "last.pt")
    assert ckpt["train_config"]["freeze_embeddings"] is False
    row = ckpt["vocab"].index("red")
    trained = ckpt["model"]["embedding.weight"][row].numpy()
    assert not np.array_equal(trained, vectors["red"])
    assert np.abs(trained - vectors["red"]).max() < 0.2  # one epoch at lr 0.01 moved it, from the file's vector


@needs_gensim
def test_word2vec_checkpoint_records_its_parameters_and_evaluates(store20, tmp_path, tiny, cli):
    out = tmp_path / "run"
    result = cli(*_fit(store20.path, out, "--embeddings", "word2vec", "--epochs", "2"))
    assert "embeddings: word2vec trained on" in result.stdout and "(100.0%)" in result.stdout
    ckpt = _load(out / "model.pt")
    cfg = ckpt["train_config"]
    assert cfg["embeddings"] == "word2vec" and cfg["freeze_embeddings"] is False
    assert cfg["word2vec"] == {"sg": True, "window": 5, "negative": 5, "epochs": 10, "sample": 1e-3}
    model, vocab = build_decoder(ckpt)
    assert model.embedding.weight.shape == (len(vocab), DIM)
    cli(*_fit(store20.path, out, "--epochs", "3", "--resume"))
    assert _load(out / "last.pt")["train_config"]["word2vec"] == cfg["word2vec"]
    result = cli("evaluate", "--model", out / "model.pt", "--store", store20.path, "--device", "cpu", "--no-meteor")
    assert "CIDEr-D" in result.stdout


def test_a_checkpoint_from_before_embeddings_resumes_as_random(store20, tmp_path, tiny, cli):
    out = tmp_path / "run"
    cli(*_fit(store20.path, out))
    ckpt = _load(out / "last.pt")
    for key in ("embeddings", "freeze_embeddings", "word2vec"):
        del ckpt["train_config"][key]
    torch.save(ckpt, out / "last.pt")
    cli(*_fit(store20.path, out, "--epochs", "2", "--resume"))
    cfg = _load(out / "last.pt")["train_config"]
    assert cfg["embeddings"] == "random" and cfg["freeze_embeddings"] is False and cfg["word2vec"]["window"] == 5


@needs_gensim
def test_a_file_of_another_dimension_is_an_error_line(store20, tmp_path, tiny, cli):
    path = write_vectors(tmp_path / "glove.txt", ["red", "a"], np.ones((2, 50), dtype=np.float32), "glove")
    out = tmp_path / "run"
    result = cli(*_fit(store20.path, out, "--embeddings", path), code=1)
    line = _error_line(result)
    assert "50-dimensional" in line and f"embedding size is {DIM}" in line
    assert not (out / "last.pt").exists()


@needs_gensim
@pytest.mark.parametrize(
    "data",
    [b"", bytes(range(256)) * 4, pickle.dumps({"red": [0.5] * DIM}), b"2 16\nred 0.5 0.25\n"],
    ids=["empty", "garbage", "pickle", "truncated"],
)
def test_bad_vectors_files_are_one_error_line(store20, tmp_path, tiny, cli, data):
    path = tmp_path / "bad.vec"
    path.write_bytes(data)
    result = cli(*_fit(store20.path, tmp_path / "run", "--embeddings", path), code=1)
    assert str(path) in _error_line(result)


def test_missing_file_and_missing_gensim_are_error_lines(store20, tmp_path, tiny, cli, monkeypatch):
    result = cli(*_fit(store20.path, tmp_path / "run", "--embeddings", "word2Vec"), code=1)  # a typo: not a file
    assert "random, word2vec or the path" in _error_line(result)
    monkeypatch.setitem(sys.modules, "gensim", None)  # as without the extra: `import gensim` raises ImportError
    path = tmp_path / "v.txt"
    path.write_text("1 16\nred" + " 0.5" * 16 + "\n", encoding="utf-8")
    for spec in ("word2vec", path):
        result = cli(*_fit(store20.path, tmp_path / "run", "--embeddings", spec), code=1)
        line = _error_line(result)
        assert "needs gensim" in line and "uv sync --extra word2vec" in line
