"""CIDEr-D, equal to pycocoevalcap 1.2's `Cider` (to 1e-6), fast enough for every validation and for
self-critical (SCST) rewards.

What: `CiderD.from_references(corpus)` counts the n-gram document frequencies of a corpus of reference lists
once (one document per image, as coco-caption does); `score` then scores one candidate per image, and
`score_samples` several per image (SCST's sampled captions, as text or as token ids), vectorised over the
batch with numpy. `corpus_score` is fit's validation CIDEr-D: tokenised as `metrics.cider_d` tokenises, with
the document frequencies of the scored references, as pycocoevalcap does.

Why hand-written: pycocoevalcap recomputes the document frequencies from the scored references on every call
(so it cannot score a batch of train images with the train split's statistics), and works n-gram by n-gram in
Python dicts, references included: ~80-130 ms for 32 images x 5 samples on a shared 2-core CPU, as long as a
training step. Here a batch of that size takes ~2 ms (benchmarks/bench_cider.py).

How: words and n-grams are integers. An n-gram's code is (id of its first n-1 words) << 32 | (id of its last
word), and its id is the code's index in the corpus's sorted table of that order (n-grams absent from the
corpus get ids past the table's end), so n-grams are told apart exactly, whatever the vocabulary's size. Each
image's references are turned into tf-idf entries once and cached (~4 KB an image); a call then handles the
candidates' n-grams only: a few numpy operations per n-gram order, and one sorted join against the references
of their images. The tables of the Flickr30k train split take ~17 MB.

The arithmetic is pycocoevalcap's, quirks included (see `CiderD`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence

import numpy as np

N = 4  # n-grams of 1..4 words (pycocoevalcap's `n` argument does not work: it always counts 1..4-grams)
SIGMA = 6.0  # the length penalty's standard deviation, in words
CACHE_IMAGES = 40_000  # reference lists kept ready (~4 KB each for 5 Flickr30k captions): a Flickr30k train split
_SHIFT = 32  # an n-gram's code: (id of its first n-1 words) << 32 | (id of its last word)


class _Words(dict):
    """word -> id; a word seen for the first time gets the next id (equal to no id given before)."""

    def __missing__(self, word: str) -> int:
        self[word] = i = len(self)
        return i


class _Block:
    """One image's references, ready to join: their n-gram entries sorted by key, then by reference."""

    __slots__ = ("key", "vec", "slot", "norms", "lengths")

    def __init__(self, key: np.ndarray, vec: np.ndarray, slot: np.ndarray, norms: np.ndarray, lengths: np.ndarray):
        self.key = key  # (E,) n-gram id * n + order - 1
        self.vec = vec  # (E,) tf * idf in that reference
        self.slot = slot  # (E,) which of the image's references
        self.norms = norms  # (m, n) each reference's norm per order
        self.lengths = lengths  # (m,) words per reference


def _first_of_runs(sorted_values: np.ndarray) -> np.ndarray:
    """(len,) bool: where a run of equal values starts."""
    first = np.ones(len(sorted_values), bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    return first


def _positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every word of concatenated captions: its caption, and the words from it to its caption's end."""
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    ends = np.cumsum(lengths)
    return row_of, ends[row_of] - np.arange(int(ends[-1]) if len(ends) else 0)


class CiderD:
    """CIDEr-D with the document frequencies of a fixed corpus of reference lists (one list per image).

    `CiderD.from_references(refs).score(candidates, refs)` equals pycocoevalcap's
    `Cider().compute_score(gts, res)`, which takes the document frequencies from the scored references and
    log(number of scored images) as the log corpus size. Built from another corpus (the train split's, for SCST
    rewards), the idf is that corpus's: log(its size) - log(max(1, df)).

    Captions are tokenised text (words separated by whitespace), or token ids (`score_samples`) when the
    scorer was built with `words`, the vocabulary's id -> word list: id i is then the word words[i], so sampled
    ids are scored against references given as text without decoding them. References must be tokenised the
    way the vocabulary's words are.

    pycocoevalcap's quirks, kept: n-grams absent from the corpus, and those in one document only, get idf
    log(size); an n-gram in every document gets idf 0, so with a corpus of one image every score is 0; the
    clipped similarity min(c, r) * r is divided by the unclipped norms. Where pycocoevalcap fails (every
    reference empty: max() of no document frequency), every score here is 0.
    """

    def __init__(self, words: _Words, vocab_size: int | None, sigma: float) -> None:
        """An empty corpus: use `from_references`."""
        self.n = n = N
        self.sigma = sigma
        self.size = 0  # images (documents) of the corpus
        self.ref_len = 0.0  # log(size)
        self.tables = [np.zeros(0, np.int64) for _ in range(n)]  # per order: the corpus's n-gram codes, sorted
        # per order, by id: the document frequency (uint16 up to 65,535 images: 2 bytes an n-gram), and 0 past
        # the end for the ids of n-grams outside the corpus
        self._df = [np.zeros(1, np.uint16) for _ in range(n)]
        # per order: codes and ids of reference n-grams outside the corpus (references of other images)
        self._extra = [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(n)]
        self._words = words
        self._vocab_size = vocab_size  # ids below it are the `words` given; None: built without `words`
        self._blocks: dict[tuple[str, ...], _Block] = {}

    @classmethod
    def from_references(
        cls,
        references: Sequence[Sequence[str]],
        words: Sequence[str] | None = None,
        sigma: float = SIGMA,
    ) -> CiderD:
        """Count the document frequencies of `references` (each image's tokenised reference captions; an image
        is one document). `words`: a vocabulary's id -> word list, for `score_samples` on token ids."""
        if not references:
            raise ValueError("need the references of at least one image")
        table = _Words()
        if words is not None:
            table.update((w, i) for i, w in enumerate(words))
            if len(table) != len(words):
                raise ValueError("`words` holds a word twice")
        scorer = cls(table, len(words) if words is not None else None, sigma)
        n = scorer.n
        counts = np.array([len(r) for r in references])
        row, key, _, _ = scorer._vectors(*scorer._text_ids([c for refs in references for c in refs]), persist=True)
        scorer.tables = [codes for codes, _ in scorer._extra]  # with no table yet, every n-gram was new:
        scorer._extra = [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(n)]  # ids = sorted ranks
        scorer.size = len(references)
        scorer.ref_len = math.log(float(scorer.size))
        span = int(key.max()) + 1 if len(key) else 1
        documents = np.sort(np.repeat(np.arange(len(references)), counts)[row] * span + key)
        keys = documents[_first_of_runs(documents)] % span  # each n-gram once per image
        for k in range(n):
            df = np.bincount(keys[keys % n == k] // n, minlength=len(scorer.tables[k]))
            scorer._df[k] = np.append(df, 0).astype(np.uint16 if scorer.size < 2**16 else np.uint32)
        return scorer

    # -- captions to word ids, n-grams to ids -------------------------------------------------------------

    def _text_ids(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(P,) word ids of all captions concatenated, (R,) words per caption."""
        split = [caption.split() for caption in captions]
        words = list(itertools.chain.from_iterable(split))
        ids = np.fromiter(map(self._words.__getitem__, words), np.int64, len(words))
        return ids, np.fromiter(map(len, split), np.int64, len(split))

    def _token_ids(
        self, ids: np.ndarray, end_id: int | None, ignore_ids: Collection[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R, T) token ids -> `_text_ids`'s pair: each row cut before its first `end_id`, `ignore_ids` out."""
        if self._vocab_size is None:
            raise ValueError("token ids need a scorer built with `words` (the vocabulary's id -> word list)")
        keep = np.ones(ids.shape, bool)
        if end_id is not None:
            keep &= np.cumsum(ids == end_id, axis=1) == 0
        for i in ignore_ids:
            keep &= ids != i
        flat = ids[keep].astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self._vocab_size):
            raise ValueError(f"token ids must be in [0, {self._vocab_size}), the `words` the scorer was built with")
        return flat, keep.sum(axis=1).astype(np.int64)

    def _find(self, k: int, codes: np.ndarray, persist: bool) -> tuple[np.ndarray, np.ndarray]:
        """Ids and idf of distinct sorted order-k n-gram codes. An id is the index in the corpus table; else an
        id of `_extra`, where `persist` adds the codes not there (references: their ids must hold across calls);
        else an id for this call only (candidates), past all of those. A code is looked up only where its first
        n-1 words could be there: an n-gram is in a document only if its prefix is. Sorted queries walk the
        large table in one direction: much faster than random ones once it has left the CPU cache."""
        ids = np.full(len(codes), -1)
        table = self.tables[k]
        extra_codes, extra_ids = self._extra[k]
        in_table = in_extra = None  # None: every prefix (unigrams)
        if k:
            prefix = codes >> _SHIFT
            in_table = prefix < len(self.tables[k - 1])
            in_extra = prefix < len(self.tables[k - 1]) + len(self._extra[k - 1][0])
        for known, known_ids, where in ((table, None, in_table), (extra_codes, extra_ids, in_extra)):
            if not len(known):
                continue
            ask = np.flatnonzero(ids < 0) if where is None else np.flatnonzero((ids < 0) & where)
            at = np.minimum(np.searchsorted(known, codes[ask]), len(known) - 1)
            hit = known[at] == codes[ask]
            ids[ask[hit]] = at[hit] if known_ids is None else known_ids[at[hit]]
        new = np.flatnonzero(ids < 0)
        base = len(table) + len(extra_codes)
        ids[new] = base + np.arange(len(new))
        if persist and len(new):
            both = np.concatenate([extra_codes, codes[new]])
            order = np.argsort(both, kind="stable")
            self._extra[k] = (both[order], np.concatenate([extra_ids, ids[new]])[order])
        df = self._df[k][np.minimum(ids, len(table))]  # past the table: df 0 in the corpus
        return ids, self.ref_len - np.log(np.maximum(df, 1), dtype=np.float64)

    def _vectors(
        self, ids: np.ndarray, lengths: np.ndarray, persist: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each distinct n-gram of each caption (ids, lengths as `_text_ids` gives them): its caption, key
        (n-gram id * n + order - 1), tf and idf. The ids of order k come from the (k-1)-gram ids (`_find`)."""
        n = self.n
        row_of, left = _positions(lengths)
        prefix = np.zeros(len(ids), np.int64)  # (P,) id of the (k-1)-gram starting at each word
        at = np.arange(len(ids))
        out = []
        for k in range(n):
            # where a (k+1)-gram starts, in the order of their k-grams: nearly sorted, which the sort exploits
            at = at[left[at] > k]
            codes = (prefix[at] << _SHIFT) | ids[at + k]
            order = np.argsort(codes, kind="stable")  # stable: each n-gram's captions stay in order
            at, codes = at[order], codes[order]
            first = _first_of_runs(codes)
            gram_ids, idf = self._find(k, codes[first], persist)  # per distinct n-gram
            gram_of = np.cumsum(first) - 1  # each occurrence's distinct n-gram
            prefix[at] = gram_ids[gram_of]
            rows = row_of[at]
            starts = first.copy()  # where a run of one n-gram in one caption starts
            starts[1:] |= rows[1:] != rows[:-1]
            starts = np.flatnonzero(starts)
            gram_of = gram_of[starts]
            out.append((rows[starts], gram_ids[gram_of] * n + k, np.diff(np.append(starts, len(at))), idf[gram_of]))
        row, key, tf, idf = (np.concatenate(parts) for parts in zip(*out, strict=True))
        return row, key, tf, idf

    def _norms(self, row: np.ndarray, key: np.ndarray, vec: np.ndarray, captions: int) -> np.ndarray:
        """(captions, n) the norm of each caption's tf-idf vector, per order."""
        squares = np.bincount(row * self.n + key % self.n, weights=vec * vec, minlength=captions * self.n)
        return np.sqrt(squares).reshape(captions, self.n)

    def _blocks_for(self, references: Sequence[Sequence[str]]) -> list[_Block]:
        """Each image's `_Block`, from the cache or made now (all the missing ones in one pass)."""
        keys = [tuple(refs) for refs in references]
        ready = {key: self._blocks[key] for key in keys if key in self._blocks}
        missing = [key for key in dict.fromkeys(keys) if key not in ready]
        if missing:
            if any(not key for key in missing):
                raise ValueError(f"image {keys.index(())} has no references")
            counts = np.array([len(key) for key in missing])
            ids, lengths = self._text_ids([c for key in missing for c in key])
            row, key, tf, idf = self._vectors(ids, lengths, persist=True)
            vec = tf * idf
            norms = self._norms(row, key, vec, len(lengths))
            ref_start = np.cumsum(counts) - counts
            image = np.repeat(np.arange(len(missing)), counts)[row]
            order = np.argsort(image * (int(key.max()) + 1 if len(key) else 1) + key, kind="stable")
            image, key, vec, slot = image[order], key[order], vec[order], (row - ref_start[image])[order]
            bounds = np.searchsorted(image, np.arange(len(missing) + 1))
            if len(self._blocks) + len(missing) > CACHE_IMAGES:
                self._blocks.clear()
            key = key.astype(np.int32) if key.max(initial=0) < 2**31 else key  # smaller blocks: more in the cache
            slot = slot.astype(np.int16) if counts.max() < 2**15 else slot
            for u, refs in enumerate(missing):
                a, b, r = bounds[u], bounds[u + 1], ref_start[u]
                ready[refs] = self._blocks[refs] = _Block(
                    key[a:b], vec[a:b], slot[a:b], norms[r : r + counts[u]], lengths[r : r + counts[u]]
                )
        return [ready[key] for key in keys]

    # -- scoring ------------------------------------------------------------------------------------------

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """(corpus score, (B,) per image) of one tokenised candidate per image against that image's tokenised
        references: pycocoevalcap's `Cider().compute_score` when this scorer was built from `references`."""
        if len(candidates) != len(references) or not candidates:
            raise ValueError("need one candidate per image, and at least one image")
        per_image = self._score(*self._text_ids(candidates), np.arange(len(candidates)), references)
        return float(per_image.mean()), per_image

    def score_samples(
        self,
        samples: Sequence[Sequence[str]] | Sequence[Sequence[Sequence[int]]] | np.ndarray,
        references: Sequence[Sequence[str]],
        *,
        end_id: int | None = None,
        ignore_ids: Collection[int] = (),
    ) -> np.ndarray:
        """(B, K) scores of K candidates for each of B images (SCST's samples, or its greedy baseline: K=1).

        `samples`: B lists of K tokenised captions; or token ids (scorer built with `words`): an integer array
        (B, K, T), or (B*K, T) image by image (a CPU torch tensor works), or B lists of K id sequences. Ids are
        cut before the first `end_id`, and `ignore_ids` (<pad>, <start>, <unk>...) are left out, as the
        vocabulary's decode does."""
        b = len(references)
        if not b:
            raise ValueError("need at least one image")
        if isinstance(samples, (list, tuple)):
            if len(samples) != b or len({len(s) for s in samples}) != 1:
                raise ValueError("need B lists of K samples each, one list per image")
            k = len(samples[0])
            flat = [c for s in samples for c in s]
            if all(isinstance(c, str) for c in flat):
                ids, lengths = self._text_ids(flat)
            else:
                parts = [self._token_ids(np.asarray(c, np.int64).reshape(1, -1), end_id, ignore_ids) for c in flat]
                ids = np.concatenate([p[0] for p in parts] or [np.zeros(0, np.int64)])
                lengths = np.concatenate([p[1] for p in parts] or [np.zeros(0, np.int64)])
        else:
            array = np.asarray(samples)
            if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (2, 3) or len(array) % b:
                raise ValueError("token ids: an integer array (B, K, T) or (B*K, T), image by image")
            array = array.reshape(-1, array.shape[-1])
            k = len(array) // b
            ids, lengths = self._token_ids(array, end_id, ignore_ids)
        if k == 0:
            return np.zeros((b, 0))
        return self._score(ids, lengths, np.repeat(np.arange(b), k), references).reshape(b, k)

    def _score(
        self, ids: np.ndarray, lengths: np.ndarray, image_of: np.ndarray, references: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """(C,) the score of each candidate (ids, lengths as `_text_ids` gives them) against the references
        of its image, image_of[candidate]."""
        n, c = self.n, len(lengths)
        blocks = self._blocks_for(references)
        counts = np.array([len(b.lengths) for b in blocks])  # (B,) references per image
        ref_key = np.concatenate([b.key for b in blocks])
        ref_vec = np.concatenate([b.vec for b in blocks])
        ref_slot = np.concatenate([b.slot for b in blocks])
        ref_image = np.repeat(np.arange(len(blocks)), [len(b.key) for b in blocks])
        ref_norms = np.concatenate([b.norms for b in blocks])  # (R, n)
        ref_lengths = np.concatenate([b.lengths for b in blocks])  # (R,)
        slots = int(counts.max())

        row, key, tf, idf = self._vectors(ids, lengths, persist=False)
        vec = tf * idf
        norms = self._norms(row, key, vec, c)
        # join: each candidate n-gram with the same n-gram in each reference of its image. A key past the
        # persistent ids (an n-gram of no reference) cannot match: those are left out.
        span = int(max(key.max() if len(key) else 0, ref_key.max() if len(ref_key) else 0)) + 1
        ref_joint = ref_image * span + ref_key  # sorted: blocks in image order, each sorted by key
        runs = np.flatnonzero(_first_of_runs(ref_joint))
        run_length = np.zeros(len(ref_joint) + 1, np.int64)
        run_length[runs] = np.diff(np.append(runs, len(ref_joint)))
        persistent = np.array([len(t) + len(e) for t, (e, _) in zip(self.tables, self._extra, strict=True)])
        ask = np.flatnonzero(key // n < persistent[key % n])
        joint = image_of[row[ask]] * span + key[ask]
        by_joint = np.argsort(joint, kind="stable")  # sorted queries: twice as fast a search
        ask, joint = ask[by_joint], joint[by_joint]
        lo = np.searchsorted(ref_joint, joint)
        hits = run_length[lo] * (np.append(ref_joint, -1)[lo] == joint)  # -1: past the end, matches nothing
        ci = np.repeat(ask, hits)  # candidate entry of each match
        ri = np.repeat(lo, hits) + np.arange(len(ci)) - np.repeat(np.cumsum(hits) - hits, hits)  # reference entry
        vc, vr = vec[ci], ref_vec[ri]
        at = (row[ci] * slots + ref_slot[ri]) * n + key[ci] % n
        dot = np.bincount(at, weights=np.minimum(vc, vr) * vr, minlength=c * slots * n).astype(np.float64)
        dot = dot.reshape(c, slots, n)  # (C, slots, n); bincount of nothing is int

        ref_start = np.cumsum(counts) - counts
        valid = np.arange(slots) < counts[image_of].reshape(c, 1)  # (C, slots)
        pair_ref = np.where(valid, ref_start[image_of].reshape(c, 1) + np.arange(slots), 0)  # (C, slots) -> R
        den = norms.reshape(c, 1, n) * ref_norms[pair_ref]  # (C, slots, n)
        cosine = np.divide(dot, den, out=np.zeros_like(dot), where=den != 0).sum(axis=2)  # (C, slots)
        # the length, as pycocoevalcap counts it: the number of bigrams (the same difference as of the words,
        # but where a caption is empty, and then its similarity is 0 anyway)
        bigrams, ref_bigrams = np.maximum(lengths - 1, 0), np.maximum(ref_lengths - 1, 0)
        delta = (bigrams.reshape(c, 1) - ref_bigrams[pair_ref]).astype(np.float64)
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        return 10.0 * (cosine * penalty * valid).sum(axis=1) / n / counts[image_of]


class CorpusScore:
    """`corpus_score` against fixed references, their n-gram statistics computed once: fit's validation scores
    the same images every epoch."""

    def __init__(self, references: Sequence[Sequence[str]]) -> None:
        from pipeline.metrics import simple_tokenize

        self._tokenize = simple_tokenize
        self.references = [[simple_tokenize(r) for r in rs] for rs in references]
        self._scorer = CiderD.from_references(self.references)

    def __call__(self, candidates: Sequence[str]) -> float:
        # "<empty>": as metrics.cider_d gives an empty caption to pycocoevalcap
        cands = [self._tokenize(c) or "<empty>" for c in candidates]
        return self._scorer.score(cands, self.references)[0]


def corpus_score(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D of raw captions, tokenised as `metrics.cider_d` tokenises them (Python, not PTB) and with
    the document frequencies of these references: fit's validation score, equal to `metrics.cider_d`."""
    return CorpusScore(references)(candidates)
