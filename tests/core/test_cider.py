"""pipeline.cider against its oracle, pycocoevalcap 1.2's CIDEr-D, to 1e-6: per image and corpus, on generated
captions (hypothesis), on edge cases, and on real Flickr30k captions; the SCST paths (document frequencies of
another corpus, several samples per image, token ids); and the validation score fit uses."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import shared_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import metrics
from pipeline.cider import CiderD, corpus_score

TOL = 1e-6


def pycoco(candidates: list[str], references: list[list[str]]) -> tuple[float, np.ndarray]:
    """pycocoevalcap's Cider, as coco-caption calls it: the df of the scored references."""
    from pycocoevalcap.cider.cider import Cider

    score, scores = Cider().compute_score(
        {i: list(r) for i, r in enumerate(references)}, {i: [c] for i, c in enumerate(candidates)}
    )
    return float(score), np.asarray(scores, dtype=np.float64)


def pycoco_with_df(corpus: list[list[str]], candidates: list[str], references: list[list[str]]) -> np.ndarray:
    """pycocoevalcap's CiderScorer arithmetic with the df of `corpus` and log(len(corpus)) as the log corpus
    size, as SCST uses it: compute_cider takes log(len(crefs)), so the scored entries are padded to the
    corpus's size with entries whose scores are dropped."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    assert len(candidates) <= len(corpus)
    source = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        source += (None, list(refs))
    source.compute_doc_freq()
    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references, strict=True):
        scorer += (candidate, list(refs))
    for _ in range(len(corpus) - len(candidates)):
        scorer += ("", ["padding"])
    scorer.document_frequency = source.document_frequency
    return np.asarray(scorer.compute_cider()[: len(candidates)], dtype=np.float64)


def assert_same_as_pycoco(candidates: list[str], references: list[list[str]]) -> None:
    corpus, per_image = CiderD.from_references(references).score(candidates, references)
    if not any(r.split() for refs in references for r in refs):
        with pytest.raises(ValueError):  # pycocoevalcap takes max() of the df of no n-gram; ours is 0
            pycoco(candidates, references)
        assert corpus == 0 and not per_image.any()
        return
    expected_corpus, expected = pycoco(candidates, references)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=TOL)
    assert corpus == pytest.approx(expected_corpus, abs=TOL)


# small alphabets, so that n-grams repeat within and across captions
WORDS = ["a", "dog", "the", "man", "runs", "on", "grass", "red"]
caption = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)
spaced = st.lists(st.sampled_from(WORDS), max_size=14).map(lambda ws: "  ".join(ws) + " ")  # stray whitespace
references = st.lists(st.one_of(caption, spaced), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(caption, spaced), references), min_size=1, max_size=7))
def test_equals_pycocoevalcap_on_generated_captions(images):
    assert_same_as_pycoco([c for c, _ in images], [r for _, r in images])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(caption, references), min_size=2, max_size=5), st.sampled_from([0.5, 2.0, 20.0]))
def test_other_sigmas_equal_pycocoevalcap(images, sigma):
    from pycocoevalcap.cider.cider import Cider

    candidates, refs = [c for c, _ in images], [r for _, r in images]
    if not any(r.split() for rs in refs for r in rs):
        return
    res = {i: [c] for i, c in enumerate(candidates)}
    _, expected = Cider(sigma=sigma).compute_score(dict(enumerate(refs)), res)
    _, got = CiderD.from_references(refs, sigma=sigma).score(candidates, refs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "candidates, references",
    [
        pytest.param(["", "a dog runs"], [["a dog runs"], ["a man runs on the grass"]], id="empty candidate"),
        pytest.param(
            ["a man runs on the grass with a red dog and the dog runs on the red grass", "a dog"],
            [["a man runs", "the man"], ["a dog", "a red dog"]],
            id="candidate longer than refs",
        ),
        pytest.param(["a a a a a a", "dog dog the dog"], [["a a dog", "a"], ["the dog", "dog"]], id="repeated words"),
        pytest.param(
            ["a dog runs", "the man", "red grass"],
            [["a dog runs"], ["the man", "a man", "the men", "men", "a person"], ["red grass", "", "grass"]],
            id="different numbers of references, an empty reference",
        ),
        pytest.param(["a dog runs on the grass"], [["a dog runs on the grass", "a dog"]], id="a single image"),
        pytest.param(["dog", "a dog"], [["dog"], ["a dog"]], id="one-word and identical candidates"),
        pytest.param(["zebra crossing", "zebra"], [["a dog"], ["the man"]], id="words of no reference"),
    ],
)
def test_edge_cases_equal_pycocoevalcap(candidates, references):
    assert_same_as_pycoco(candidates, references)


def test_a_single_image_scores_zero_as_in_pycocoevalcap():
    # log(1 document) - log(df 1) = 0: every idf is 0, a quirk kept as is
    assert CiderD.from_references([["a dog runs"]]).score(["a dog runs"], [["a dog runs"]])[0] == 0.0


def test_empty_references_and_mismatched_inputs_are_refused():
    scorer = CiderD.from_references([["a dog"], ["a man"]])
    with pytest.raises(ValueError, match="no references"):
        scorer.score(["a dog", "a man"], [["a dog"], []])
    with pytest.raises(ValueError, match="one candidate per image"):
        scorer.score(["a dog"], [["a dog"], ["a man"]])
    with pytest.raises(ValueError, match="token ids need"):
        scorer.score_samples(np.zeros((2, 1, 3), np.int64), [["a dog"], ["a man"]])


# -- SCST: the df of another corpus, several samples per image, token ids --------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    corpus=st.lists(references, min_size=2, max_size=8),
    data=st.data(),
)
def test_samples_with_corpus_df_equal_pycocoevalcap_arithmetic(corpus, data):
    """Train-split df (the corpus), a batch of its images (repeats allowed) with K samples each."""
    batch = data.draw(st.lists(st.integers(0, len(corpus) - 1), min_size=1, max_size=len(corpus)))
    k = data.draw(st.integers(1, 3))
    samples = [[data.draw(caption) for _ in range(k)] for _ in batch]
    refs = [corpus[i] for i in batch]
    scorer = CiderD.from_references(corpus)
    got = scorer.score_samples(samples, refs)
    assert got.shape == (len(batch), k)
    for j in range(k):
        expected = pycoco_with_df(corpus, [s[j] for s in samples], refs)
        np.testing.assert_allclose(got[:, j], expected, rtol=0, atol=TOL)
    np.testing.assert_array_equal(scorer.score_samples(samples, refs), got)  # again, from the cached references


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=st.lists(references, min_size=2, max_size=6), others=st.lists(st.tuples(caption, references), min_size=1))
def test_references_outside_the_corpus_equal_pycocoevalcap_arithmetic(corpus, others):
    """Validation images scored with the train split's df: their references hold n-grams the corpus lacks."""
    others = others[: len(corpus)]
    candidates, refs = [c for c, _ in others], [r for _, r in others]
    _, got = CiderD.from_references(corpus).score(candidates, refs)
    np.testing.assert_allclose(got, pycoco_with_df(corpus, candidates, refs), rtol=0, atol=TOL)


def test_token_ids_score_as_their_words():
    """SCST's sampled ids (<start> ... <end> <pad>..., <unk> left out) score as the text of their words."""
    from pipeline.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize

    raw = [["A dog runs on the grass.", "A brown dog runs."], ["Two men stand in a yard.", "Men standing."]]
    refs = [[" ".join(tokenize(c)) for c in caps] for caps in raw]
    vocab = Vocabulary.build([c for caps in raw for c in caps], min_count=1)
    scorer = CiderD.from_references(refs, words=vocab.itos)
    texts = [["a dog runs on the grass .", "a zebra runs"], ["two men stand", ""]]
    ids = np.full((2, 2, 12), PAD_ID)
    for b, pair in enumerate(texts):
        for k, text in enumerate(pair):
            encoded = [vocab.stoi.get(w, UNK_ID) for w in text.split()]
            ids[b, k, : len(encoded) + 2] = [START_ID, *encoded, END_ID]
    ids[0, 1, 5] = vocab.stoi["dog"]  # after <end>: ignored
    as_text = [[" ".join(w for w in t.split() if w in vocab.stoi) for t in pair] for pair in texts]  # <unk> dropped
    expected = scorer.score_samples(as_text, refs)
    kwargs = {"end_id": END_ID, "ignore_ids": (PAD_ID, START_ID, UNK_ID)}
    np.testing.assert_array_equal(scorer.score_samples(ids, refs, **kwargs), expected)
    np.testing.assert_array_equal(scorer.score_samples(ids.reshape(4, 12), refs, **kwargs), expected)
    ragged = [[list(row[: list(row).index(END_ID) + 1]) for row in pair] for pair in ids]
    np.testing.assert_array_equal(scorer.score_samples(ragged, refs, **kwargs), expected)
    assert expected[0, 0] > expected[0, 1] > 0
    with pytest.raises(ValueError, match="token ids must be in"):
        scorer.score_samples(np.full((2, 1, 3), len(vocab.itos)), refs)


# -- the validation score, and evaluate's ---------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["A dog, running.", "", "Two MEN!", "a red dog's toy"]), references),
        min_size=1,
        max_size=5,
    )
)
def test_corpus_score_equals_metrics_cider_d(images):
    candidates, refs = [c for c, _ in images], [r for _, r in images]
    if not any(metrics.simple_tokenize(r) for rs in refs for r in rs):
        with pytest.raises(ValueError):  # pycocoevalcap fails on references without a word; ours is 0
            metrics.cider_d(candidates, refs)
        assert corpus_score(candidates, refs) == 0
        return
    assert corpus_score(candidates, refs) == pytest.approx(metrics.cider_d(candidates, refs), abs=TOL)


# -- real captions -------------------------------------------------------------------------------------


def flickr30k(split: str, images: int) -> list[list[str]]:
    """The 5 raw captions of the first `images` images of a Multi30k/Flickr30k split, read in place."""
    columns = []
    for k in range(1, 6):
        with gzip.open(shared_data("flickr30k-captions", "raw", f"{split}.{k}.en.gz"), "rt", encoding="utf-8") as f:
            columns.append([line.strip() for _, line in zip(range(images), f, strict=False)])
    return [list(caps) for caps in zip(*columns, strict=True)]


def test_real_captions_equal_pycocoevalcap():
    """300 Flickr30k val images: one caption held out as the candidate, 1 to 4 of the others as references."""
    raw = flickr30k("val", 300)
    tokenised = [[metrics.simple_tokenize(c) for c in caps] for caps in raw]
    candidates = [caps[0] for caps in tokenised]
    references = [caps[1 : 2 + i % 4] for i, caps in enumerate(tokenised)]
    assert_same_as_pycoco(candidates, references)
    assert_same_as_pycoco(candidates, [caps[1:] for caps in tokenised])


def test_real_captions_scst_batch_equals_pycocoevalcap_arithmetic():
    """df of 1,000 Flickr30k train images; 16 of them with 3 samples each (other images' captions)."""
    corpus = [[metrics.simple_tokenize(c) for c in caps] for caps in flickr30k("train", 1000)]
    batch = list(range(0, 1000, 63))
    samples = [[corpus[(i + 1 + j) % 1000][j] for j in range(2)] + [corpus[i][4]] for i in batch]
    refs = [corpus[i] for i in batch]
    got = CiderD.from_references(corpus).score_samples(samples, refs)
    for j in range(3):
        np.testing.assert_allclose(got[:, j], pycoco_with_df(corpus, [s[j] for s in samples], refs), atol=TOL)
    assert (got[:, 2] > got[:, 0]).mean() > 0.8  # one of its own references beats another image's caption


def test_corpus_score_equals_evaluates_cider_d_on_real_captions(monkeypatch):
    """evaluate reports metrics.score's CIDEr-D (pycocoevalcap); the fast scorer gives the same on the same
    tokenised captions: Python-tokenised, and PTB-tokenised when Java runs."""
    raw = flickr30k("test_2016", 200)
    candidates, refs = [caps[0] for caps in raw], [caps[1:] for caps in raw]
    candidates[3] = "!!"  # tokenised to nothing: "<empty>" for both
    official = metrics.score(candidates, refs, java=False)
    assert corpus_score(candidates, refs) == pytest.approx(official["CIDEr-D"], abs=TOL)
    if not metrics.java_available():
        pytest.skip("Java is not installed: the PTB-tokenised half is not checked")
    monkeypatch.setattr(metrics, "_meteor", lambda gts, res: 0.0)  # METEOR is not what is compared here
    official = metrics.score(candidates, refs, java=True)
    assert official["tokenizer"] == "ptb"
    gts = metrics._ptb_tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = metrics._ptb_tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    ptb_refs = [gts[i] for i in range(len(refs))]
    ptb_candidates = [res[i][0] if res[i][0].strip() else "<empty>" for i in range(len(candidates))]
    mine, _ = CiderD.from_references(ptb_refs).score(ptb_candidates, ptb_refs)
    assert mine == pytest.approx(official["CIDEr-D"], abs=TOL)
