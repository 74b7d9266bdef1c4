"""Tokenising, the vocabulary built from the training split, encoding and decoding captions."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_store import make_store

from pipeline.train import TrainConfig, prepare
from pipeline.vocab import (
    END_ID,
    MAX_LEN,
    PAD_ID,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    detokenize,
    tokenize,
)


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog's toy, on the GRASS!") == ["a", "dog's", "toy", ",", "on", "the", "grass", "!"]
    assert tokenize("Two men.  Running") == ["two", "men", ".", "running"]
    assert tokenize("3 cats (black)") == ["3", "cats", "(", "black", ")"]
    assert tokenize("") == []


def test_tokens_are_nfc_and_never_only_combining_or_zero_width():
    """A caption typed half in NFC, half in NFD gave `café` and `cafe` + a lone U+0301 token; an emoji's variation
    selector left an invisible U+FE0F token, and ZWJ sequences U+200D tokens."""
    import unicodedata

    nfc, nfd = "un café à côté", unicodedata.normalize("NFD", "Un CAFÉ à côté")
    assert tokenize(nfd) == tokenize(nfc) == ["un", "café", "à", "côté"]
    v = Vocabulary.build([nfc, nfd], min_count=1)
    assert v.itos[4:] == ["café", "côté", "un", "à"]  # each word once, seen twice
    assert v.encode(nfd) == v.encode(nfc) and UNK_ID not in v.encode(nfd)
    family, thumbs = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f44d\ufe0f"
    tokens = tokenize(f"a {thumbs} for the {family} , q\u0301 \u0301 \u200b\u200d x\u200d")
    assert tokens == ["a", "\U0001f44d", "for", "the", family, ",", "q\u0301", "x"]
    assert tokenize("\U0001f44d") == tokenize(thumbs)  # with or without the emoji presentation selector
    assert tokenize("हिंदी में") == ["हिंदी", "में"]  # vowel signs are combining marks: words stay whole
    assert tokenize("می\u200cخواهم") == ["می\u200cخواهم"]  # a joiner inside a word is part of it
    for token in tokens + tokenize("\u0301\u0300 \ufe0f \u200d \u200c \u2060 \ufeff"):
        assert any(not unicodedata.category(c).startswith(("M", "C")) for c in token), repr(token)


def test_special_token_ids():
    v = Vocabulary.build(["a dog runs ."], min_count=1)
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]


def test_build_orders_by_frequency_and_respects_min_count():
    captions = ["b c c", "c a b", "d"]  # a:1 b:2 c:3 d:1
    v1 = Vocabulary.build(captions, min_count=1)
    assert v1.itos[4:] == ["c", "b", "a", "d"]  # most frequent first, ties alphabetical
    v2 = Vocabulary.build(captions, min_count=2)
    assert v2.itos[4:] == ["c", "b"]
    assert "a" not in v2.stoi and "d" not in v2.stoi
    assert Vocabulary.build(captions, min_count=4).itos == list(SPECIALS)


def test_vocabulary_comes_from_the_train_split_only(tmp_path):
    captions = [["a red square .", "red red red"]] * 6 + [["a zebra ."]] * 2 + [["a giraffe ."]] * 2
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    store = make_store(tmp_path / "s.h5", n_images=10, captions=captions, splits=splits)
    data = prepare(TrainConfig(store=str(store.path), out=str(tmp_path / "out"), device="cpu", min_word_count=1))
    words = set(data.vocab.itos[4:])
    assert words == {"a", "red", "square", "."}
    assert "zebra" not in data.vocab.stoi and "giraffe" not in data.vocab.stoi
    # val captions are still indexed, with the unknown word mapped to <unk>
    val_row = int(data.val_rows[0])
    ids = data.captions.ids[data.captions.start[val_row]]
    assert list(ids[:5]) == [START_ID, data.vocab.stoi["a"], UNK_ID, data.vocab.stoi["."], END_ID]


def test_prepare_min_word_count_counts_train_captions(tmp_path):
    # "square" appears 6 times in train, "circle" once in train and many times in val
    captions = [["a square ."]] * 6 + [["a circle ."]] + [["a circle ."]] * 3
    splits = ["train"] * 7 + ["val"] * 3
    store = make_store(tmp_path / "s.h5", n_images=10, captions=captions, splits=splits)
    data = prepare(TrainConfig(store=str(store.path), device="cpu", min_word_count=2))
    assert "square" in data.vocab.stoi and "circle" not in data.vocab.stoi
    data1 = prepare(TrainConfig(store=str(store.path), device="cpu", min_word_count=1))
    assert "circle" in data1.vocab.stoi


def test_encode_adds_start_end_and_maps_unknown_words():
    v = Vocabulary.build(["a dog runs ."], min_count=1)
    ids = v.encode("A dog flies.")
    assert ids == [START_ID, v.stoi["a"], v.stoi["dog"], UNK_ID, v.stoi["."], END_ID]


def test_encode_truncates_to_max_len_keeping_end():
    words = [f"w{i}" for i in range(30)]
    v = Vocabulary.build([" ".join(words)], min_count=1)
    ids = v.encode(" ".join(words))
    assert len(ids) == MAX_LEN == 20
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert [v.itos[i] for i in ids[1:-1]] == words[:18]
    short = v.encode(" ".join(words[:5]), max_len=4)
    assert short == [START_ID, v.stoi["w0"], v.stoi["w1"], END_ID]


def test_encode_batch_pads_and_reports_lengths():
    v = Vocabulary.build(["a dog runs .", "a cat"], min_count=1)
    ids, lengths = v.encode_batch(["a dog runs .", "a cat", ""], max_len=8)
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    assert list(lengths) == [6, 4, 2]
    assert list(ids[0]) == [START_ID, *[v.stoi[w] for w in ("a", "dog", "runs", ".")], END_ID, PAD_ID, PAD_ID]
    assert list(ids[1]) == [START_ID, v.stoi["a"], v.stoi["cat"], END_ID] + [PAD_ID] * 4
    assert list(ids[2]) == [START_ID, END_ID] + [PAD_ID] * 6


def test_decode_drops_specials_stops_at_end_and_joins_punctuation():
    v = Vocabulary.build(["a dog runs . , !"], min_count=1)
    s = v.stoi
    ids = [START_ID, s["a"], UNK_ID, s["dog"], PAD_ID, s["runs"], s["."], END_ID, s["a"], s["dog"]]
    assert v.decode(ids) == "a dog runs."
    assert v.decode([s["a"], s["dog"], s[","], s["a"], s["dog"], s["!"]]) == "a dog, a dog!"
    assert v.decode([END_ID, s["a"]]) == ""
    assert v.decode(np.array([s["a"], s["dog"]], dtype=np.int64)) == "a dog"


def test_detokenize():
    assert detokenize(["a", "dog", "."]) == "a dog."
    assert detokenize(tokenize("A man , a plan ; a canal : panama !")) == "a man, a plan; a canal: panama!"
    assert detokenize([]) == ""


def test_encode_decode_roundtrip_of_known_words():
    text = "two dogs play in the snow."
    v = Vocabulary.build([text], min_count=1)
    assert v.decode(v.encode(text)) == text


def test_to_list_from_list_roundtrip():
    v = Vocabulary.build(["the cat sat on the mat .", "the dog"], min_count=1)
    items = v.to_list()
    assert all(isinstance(w, str) for w in items)
    w = Vocabulary.from_list(items)
    assert w.itos == v.itos and w.stoi == v.stoi and len(w) == len(v)
    assert w.encode("the cat sat") == v.encode("the cat sat")
    with pytest.raises(ValueError):
        Vocabulary.from_list(["the", "cat"])
