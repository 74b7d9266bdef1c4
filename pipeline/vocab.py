"""Tokenising captions and the vocabulary built from the training split."""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.config import MAX_LEN

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[^\w\s]|_")  # ASCII text: nothing else to take care of
_NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", "'s", ")", "%"}
# Invisible characters that carry nothing a caption means, removed before tokenising: soft hyphen, zero-width
# space, direction marks and embeddings, word joiner and invisible operators, byte-order mark, variation
# selectors (an emoji with U+FE0F is the same emoji), tag characters.
_INVISIBLE = dict.fromkeys(
    [0x00AD, 0x180E, 0x200B, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2060, 0x2070), 0xFEFF,
     *range(0xFE00, 0xFE10), *range(0xE0000, 0xE0080), *range(0xE0100, 0xE01F0)]
)  # fmt: skip
_JOINERS = "\u200c\u200d"  # zero-width (non-)joiners: part of a word or emoji sequence, nothing alone


def tokenize(text: str) -> list[str]:
    """Lowercase, split punctuation off words: "A dog's toy." -> ["a", "dog's", "toy", "."].

    Text is compared in Unicode NFC (`café` typed precomposed or as `e` + U+0301 is one word). Combining marks
    stay with the letter or symbol they follow (Devanagari vowel signs, accents NFC cannot compose), joiners
    with the word or emoji sequence they join; on their own they are dropped: no token is only combining or
    zero-width characters."""
    if text.isascii():
        return _TOKEN.findall(text.lower())
    text = unicodedata.normalize("NFC", text.translate(_INVISIBLE).lower())
    return _unicode_token().findall(text)


@functools.cache
def _unicode_token() -> re.Pattern:
    """The tokeniser for text beyond ASCII (built once: the class of combining marks takes ~0.2 s)."""
    marks = _char_class(lambda c: unicodedata.category(c).startswith("M"))
    letter = r"[^\W_]"
    piece = rf"{letter}(?:{letter}|[{marks}]|[{_JOINERS}](?={letter}))*"
    word = rf"{piece}(?:['’]{piece})*"
    symbol = rf"[^\w\s{marks}{_JOINERS}]"
    # an emoji with its skin-tone modifier, or a ZWJ sequence (family, profession...), is one token; so is a flag
    emoji = rf"[\U0001F1E6-\U0001F1FF]{{2}}|{symbol}(?:[{marks}]|[\U0001F3FB-\U0001F3FF]|\u200d{symbol})*"
    return re.compile(rf"{word}|{emoji}|_")


def _char_class(test) -> str:
    """The body of a regex character class of the code points for which `test(char)` holds, as ranges."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and test(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            first, last = re.escape(chr(start)), re.escape(chr(cp - 1))
            ranges.append(f"{first}-{last}" if cp - 1 > start else first)
            start = None
    return "".join(ranges)


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
