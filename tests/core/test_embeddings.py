"""Initial word vectors (pipeline/embeddings.py): vectors files in each format, missing words, Word2Vec on the
train captions, and files that are not what they claim (each one clear UserError, never a traceback).

The vectors files are written here byte by byte as the word2vec C tool and GloVe write them, not with gensim's
writer, so that the loader is tested against the formats rather than against itself. Tests that need gensim
skip without it (it comes with the dev group, so `uv run pytest` has it; for users it is an optional extra).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_vectors import needs_gensim, write_vectors

from pipeline.embeddings import (
    Word2VecConfig,
    centred,
    initial_vectors,
    load_vectors,
    sentences,
    sniff,
    train_captions,
    train_word2vec,
)
from pipeline.errors import UserError
from pipeline.vocab import SPECIALS, Vocabulary

DIM = 6
CAPTIONS = ["A red square .", "the blue circle is here", "a red circle", "one green star ."]
VOCAB = Vocabulary.build(CAPTIONS, 1)
WORDS = VOCAB.itos[len(SPECIALS) :]
COVERED = ["a", "red", "circle", ".", "square"]  # in the files below; the other words are missing


def _vectors(words: list[str], dim: int = DIM, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, (len(words), dim)).astype(np.float32)


# -- vectors files ----------------------------------------------------------------------------------------


@needs_gensim
@pytest.mark.parametrize(
    ("fmt", "name"),
    [("binary", "v.bin"), ("text", "v.txt"), ("glove", "glove.6d.txt"), ("text", "v.vec.gz"), ("glove", "g.txt.gz")],
)
def test_file_vectors_land_in_the_matrix_for_the_words_it_covers(tmp_path, fmt, name):
    extra = ["zebra", "dog"]  # in the file, not in the vocabulary
    vectors = _vectors(COVERED + extra)
    path = write_vectors(tmp_path / name, COVERED + extra, vectors, fmt)
    assert sniff(path)[0] == fmt and sniff(path)[2] == DIM
    result = load_vectors(path, VOCAB, DIM, seed=0)
    assert result.matrix.shape == (len(VOCAB), DIM) and result.matrix.dtype == np.float32
    for i, word in enumerate(COVERED):
        np.testing.assert_allclose(result.matrix[VOCAB.stoi[word]], vectors[i], atol=1e-6)  # text: 6 decimals
    assert result.found == len(COVERED) and result.words == len(WORDS)
    assert sorted(result.missing) == sorted(set(WORDS) - set(COVERED))
    assert f"{len(COVERED)} of {len(WORDS)} vocabulary words covered" in result.summary()


@needs_gensim
def test_missing_words_get_seeded_random_vectors_of_the_files_scale(tmp_path):
    vectors = _vectors(COVERED) * 10  # std ~3: far from N(0, 1)
    path = write_vectors(tmp_path / "v.txt", COVERED, vectors, "text")
    a, b, c = (load_vectors(path, VOCAB, DIM, seed=s) for s in (0, 0, 1))
    missing = [VOCAB.stoi[w] for w in a.missing] + list(range(len(SPECIALS)))
    np.testing.assert_array_equal(a.matrix, b.matrix)  # seeded
    assert not np.array_equal(a.matrix[missing], c.matrix[missing])
    scale = vectors.std()
    assert 0.3 * scale < a.matrix[missing].std() < 3 * scale
    assert np.isfinite(a.matrix).all()
    assert "start random" in a.summary() and "blue" in a.summary()


@needs_gensim
def test_a_cased_file_covers_the_lowercase_vocabulary(tmp_path):
    words = ["Red", "red", "Circle"]  # `red` exact wins over `Red`; `circle` found through `Circle`
    vectors = _vectors(words)
    result = load_vectors(write_vectors(tmp_path / "v.bin", words, vectors, "binary"), VOCAB, DIM)
    np.testing.assert_array_equal(result.matrix[VOCAB.stoi["red"]], vectors[1])
    np.testing.assert_array_equal(result.matrix[VOCAB.stoi["circle"]], vectors[2])
    assert result.found == 2


@needs_gensim
def test_a_file_of_another_dimension_is_refused(tmp_path):
    for fmt, name in (("binary", "v.bin"), ("glove", "g.txt")):
        path = write_vectors(tmp_path / name, COVERED, _vectors(COVERED, dim=4), fmt)
        with pytest.raises(UserError, match="4-dimensional vectors, but the embedding size is 6"):
            load_vectors(path, VOCAB, DIM)


@needs_gensim
@pytest.mark.parametrize("fmt", ["binary", "text", "glove"])
def test_compression_comes_from_the_content_not_the_name(tmp_path, fmt):
    """gzip content named .txt was "not a vectors file"; plain text named .gz gave BadGzipFile, and a .bz2 name
    `OSError: Invalid data stream`. gzip, bz2 and xz are recognised by their first bytes, as the format is."""
    import bz2
    import gzip
    import lzma

    vectors = _vectors(COVERED)
    plain = write_vectors(tmp_path / "plain", COVERED, vectors, fmt).read_bytes()
    contents = {"gzip": gzip.compress(plain), "bz2": bz2.compress(plain), "xz": lzma.compress(plain), "none": plain}
    for kind, data in contents.items():
        for name in ("v.txt", "v.gz", "v.bz2", "v.xz", "v"):
            path = tmp_path / f"{kind}-{name}"
            path.write_bytes(data)
            assert sniff(path)[0] == fmt, path
            result = load_vectors(path, VOCAB, DIM)
            assert result.found == len(COVERED), path
            np.testing.assert_allclose(result.matrix[VOCAB.stoi["red"]], vectors[1], atol=1e-6)


@needs_gensim
def test_a_line_with_too_few_values_names_its_line_and_word(tmp_path):
    """A GloVe line with 5 values of 6 printed numpy's "could not broadcast input array from shape (5,)"."""
    vectors = _vectors(COVERED)
    for fmt, line in (("glove", 3), ("text", 4)):  # the header is line 1 of a word2vec text file
        text = write_vectors(tmp_path / f"ok.{fmt}", COVERED, vectors, fmt).read_text().splitlines(keepends=True)
        text[line - 1] = "circle 0.1 0.2 0.3 0.4 0.5\n"
        path = tmp_path / f"bad.{fmt}"
        path.write_text("".join(text))
        with pytest.raises(UserError) as err:
            load_vectors(path, VOCAB, DIM)
        message = str(err.value)
        assert f"line {line} ('circle') holds 5 values, not 6" in message and "broadcast" not in message, message


@needs_gensim
@pytest.mark.parametrize("fmt", ["binary", "text"])
def test_a_header_that_announces_fewer_vectors_than_the_file_holds_is_a_warning(tmp_path, fmt, caplog):
    vectors = _vectors(COVERED)
    path = write_vectors(tmp_path / "v.gz", COVERED, vectors, fmt, count=3)
    result = load_vectors(path, VOCAB, DIM)
    assert result.found == 3  # what the header says is read, as gensim reads it
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.embeddings" and r.levelname == "WARNING"]
    assert warned == [f"{path}: its header announces 3 vectors, but it holds more: only the first 3 are read"]
    caplog.clear()
    load_vectors(write_vectors(tmp_path / "w.bin", COVERED, vectors, fmt), VOCAB, DIM)
    assert not [r for r in caplog.records if r.name.startswith("pipeline")]


@needs_gensim
def test_a_files_words_are_compared_in_nfc(tmp_path):
    import unicodedata

    vocab = Vocabulary.build(["un café noir"], 1)
    words = [unicodedata.normalize("NFD", "Café"), "noir"]  # an NFD, capitalised word finds `café`
    vectors = _vectors(words)
    result = load_vectors(write_vectors(tmp_path / "v.txt", words, vectors, "text"), vocab, DIM)
    np.testing.assert_allclose(result.matrix[vocab.stoi["café"]], vectors[0], atol=1e-6)
    assert result.found == 2


def _garbage(tmp_path: Path) -> dict[str, Path]:
    """Files that are not vectors files, or damaged ones."""
    vectors = _vectors(COVERED)
    good_bin = write_vectors(tmp_path / "good.bin", COVERED, vectors, "binary").read_bytes()
    good_txt = write_vectors(tmp_path / "good.txt", COVERED, vectors, "text").read_text()
    files = {
        "empty": b"",
        "blank lines": b"\n\n  \n",
        "random bytes": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "pickle": pickle.dumps({"a": np.ones(DIM)}),
        "truncated binary": good_bin[: len(good_bin) // 2],
        "binary missing its last bytes": good_bin[:-10],
        "binary header only": good_bin[: good_bin.index(b"\n") + 1],
        "truncated text (count unmet)": good_txt[: good_txt.index("\n", len(good_txt) // 2) + 1].encode(),
        "truncated text line": good_txt[: good_txt.rindex(" ", 0, len(good_txt) - 30)].encode(),
        "text line with one value": (good_txt + "blue 0.5\n").replace(f"{len(COVERED)} {DIM}", f"6 {DIM}").encode(),
        "huge count in header": f"999999999999 {DIM}\n".encode() + good_bin[good_bin.index(b"\n") + 1 :],
        "negative count": f"-5 {DIM}\n".encode(),
        "NaN values": f"1 {DIM}\nred {' '.join(['nan'] * DIM)}\n".encode(),
        "infinite values": f"red {' '.join(['inf'] * DIM)}\n".encode(),
        "words, no numbers": b"the quick brown fox\njumps over\n",
        "a JSON file": b'{"red": [1, 2, 3, 4, 5, 6]}\n',
        "gz that is not gzip": b"not gzip at all",
    }
    paths = {}
    for i, (name, data) in enumerate(files.items()):
        suffix = ".txt.gz" if "gzip" in name else ".txt"
        paths[name] = tmp_path / f"bad{i}{suffix}"
        paths[name].write_bytes(data)
    return paths


BAD = [
    "empty",
    "blank lines",
    "random bytes",
    "pickle",
    "truncated binary",
    "binary missing its last bytes",
    "binary header only",
    "truncated text (count unmet)",
    "truncated text line",
    "text line with one value",
    "huge count in header",
    "negative count",
    "NaN values",
    "infinite values",
    "words, no numbers",
    "a JSON file",
    "gz that is not gzip",
]


@needs_gensim
@pytest.mark.parametrize("kind", BAD)
def test_a_bad_vectors_file_is_one_user_error(tmp_path, kind):
    path = _garbage(tmp_path)[kind]
    with pytest.raises(UserError) as err:
        load_vectors(path, VOCAB, DIM)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


def test_a_missing_file_or_a_folder_is_refused_before_gensim_is_needed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)  # not even imported for these
    with pytest.raises(UserError, match="not found.*random, word2vec or the path"):
        initial_vectors(str(tmp_path / "nope.txt"), VOCAB, CAPTIONS, DIM)
    with pytest.raises(UserError, match="is not a file"):
        initial_vectors(str(tmp_path), VOCAB, CAPTIONS, DIM)


def test_without_gensim_word2vec_and_files_say_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "v.txt"
    path.write_text("1 6\nred 1 2 3 4 5 6\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "gensim", None)  # `import gensim` raises ImportError
    for spec in ("word2vec", str(path)):
        with pytest.raises(UserError) as err:
            initial_vectors(spec, VOCAB, CAPTIONS, DIM)
        assert "needs gensim" in str(err.value) and "uv sync --extra word2vec" in str(err.value)


def test_random_needs_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)
    assert initial_vectors("random", VOCAB, CAPTIONS, DIM) is None


# -- Word2Vec on the training captions -------------------------------------------------------------------


def test_word2vec_sentences_are_the_captions_as_the_decoder_reads_them():
    vocab = Vocabulary.build(["a red square", "a red circle"], 2)  # `square`, `circle` are rare: <unk>
    assert sentences(vocab, ["A red square."]) == [["<start>", "a", "red", "<unk>", "<unk>", "<end>"]]


def test_train_captions_are_those_of_the_train_images_only():
    texts = ["t0", "v1", "t0b", "x2"]
    owners = np.array([0, 1, 0, 2], dtype=np.int32)
    assert train_captions(texts, owners, np.array([0])) == ["t0", "t0b"]
    assert train_captions(texts, owners, np.array([0, 2])) == ["t0", "t0b", "x2"]


@needs_gensim
def test_word2vec_covers_the_vocabulary_at_the_embedding_size_and_is_seeded():
    captions = CAPTIONS * 20
    cfg = Word2VecConfig(epochs=3)
    a, b = (train_word2vec(VOCAB, captions, DIM, 0, cfg) for _ in range(2))
    c = train_word2vec(VOCAB, captions, DIM, 1, cfg)
    assert a.matrix.shape == (len(VOCAB), DIM) and a.found == a.words == len(WORDS) and not a.missing
    np.testing.assert_array_equal(a.matrix, b.matrix)  # one worker thread: the same vectors for the same seed
    assert not np.array_equal(a.matrix, c.matrix)
    assert np.isfinite(a.matrix).all()
    assert "word2vec trained on 80 train captions" in a.summary() and "skip-gram, window 5, 3 epochs" in a.summary()
    assert initial_vectors("word2vec", VOCAB, captions, DIM, 0, cfg).matrix.tobytes() == a.matrix.tobytes()
    # centred and at the random init's scale (RMS 1), the directions between words kept
    np.testing.assert_allclose(a.matrix.mean(axis=0), 0, atol=1e-5)
    assert np.sqrt(np.mean(np.square(a.matrix))) == pytest.approx(1, rel=1e-4)
    assert "centred, RMS 1" in a.summary()


def test_centred_removes_the_common_direction_and_sets_rms_1():
    rng = np.random.default_rng(0)
    m = (rng.normal(0, 0.05, (50, 8)) + 0.2).astype(np.float32)  # small, all pointing one way
    c = centred(m)
    np.testing.assert_allclose(c.mean(axis=0), 0, atol=1e-6)
    assert np.sqrt(np.mean(np.square(c))) == pytest.approx(1, rel=1e-5)
    np.testing.assert_allclose(c * np.sqrt(np.mean(np.square(m - m.mean(0)))), m - m.mean(0), rtol=1e-4, atol=1e-6)


@needs_gensim
def test_word2vec_without_any_caption_word_is_a_user_error():
    with pytest.raises(UserError, match="no words"):
        train_word2vec(VOCAB, [], DIM, 0, Word2VecConfig())
