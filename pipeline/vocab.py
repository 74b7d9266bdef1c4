"""Tokenising captions and the vocabulary built from the training split."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.config import MAX_LEN

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]|_")
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", "'s", ")", "%"}


def tokenize(text: str) -> list[str]:
    """Lowercase, split punctuation off words: "A dog's toy." -> ["a", "dog's", "toy", "."]."""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Iterable[str]) -> str:
    """Join tokens as written: no space before closing punctuation."""
    out = ""
    for tok in tokens:
        out += tok if (not out or tok in _NO_SPACE_BEFORE) else " " + tok
    return out


class Vocabulary:
    """Words to ids and back. Ids 0-3 are <pad>, <start>, <end>, <unk>; then words by frequency."""

    def __init__(self, words: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical: deterministic)."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def to_list(self) -> list[str]:
        """What checkpoints store: the words in id order (loadable with weights_only=True)."""
        return list(self.itos)

    @classmethod
    def from_list(cls, itos: Sequence[str]) -> Vocabulary:
        if list(itos[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError("not a vocabulary: the first ids must be the special tokens")
        return cls(list(itos[len(SPECIALS) :]))

    def encode(self, caption: str, max_len: int = MAX_LEN) -> list[int]:
        """<start> words <end>, cut to `max_len` tokens keeping <end>, not padded."""
        ids = [self.stoi.get(t, UNK_ID) for t in tokenize(caption)][: max_len - 2]
        return [START_ID, *ids, END_ID]

    def encode_batch(self, captions: Sequence[str], max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
        """(M, max_len) int32 ids padded with <pad>, and (M,) lengths (tokens incl. <start>/<end>)."""
        out = np.full((len(captions), max_len), PAD_ID, dtype=np.int32)
        lengths = np.zeros(len(captions), dtype=np.int32)
        for i, caption in enumerate(captions):
            ids = self.encode(caption, max_len)
            out[i, : len(ids)] = ids
            lengths[i] = len(ids)
        return out, lengths

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text: stops at <end>, drops the other special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i >= len(SPECIALS):
                words.append(self.itos[i])
        return detokenize(words)
