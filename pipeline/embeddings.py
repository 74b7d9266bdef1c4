"""Initial word vectors for the decoder's embedding layer (`fit --embeddings`).

- `random`: nn.Embedding's own initialisation, N(0, 1), as the report trained it.
- `word2vec`: a Word2Vec model (gensim) trained on the **training** captions only, at the embedding size.
  Its sentences are the captions as fit encodes them: the vocabulary's words, rarer words as `<unk>`,
  between `<start>` and `<end>`, so every id the decoder reads gets a vector. The vectors are centred and
  scaled to RMS 1 (see `centred`: as they come out of gensim, they measured worse than random).
- a file: pretrained vectors in word2vec binary, word2vec text or GloVe text (no header) format, read with
  gensim's KeyedVectors loader, gzip-, bz2- or xz-compressed or not: format and compression both come from
  the file's first bytes, never from its name. Vocabulary words the file lacks get random vectors of the
  same scale as the ones it has.

The functions here build a (V, D) matrix and say how much of the vocabulary it covers; fit copies it into the
model once, before the first epoch (a resumed run has it in its checkpoint already). gensim is an optional
extra, imported only when asked for. A file's vectors are copied as they are (not rescaled): "the file's
vector of `dog`" stays exactly that, and a missing word's random vector matches their scale.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import math
import os
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

import numpy as np

from pipeline.config import Word2VecConfig
from pipeline.errors import UserError, describe
from pipeline.vocab import END, SPECIALS, START, UNK, Vocabulary, tokenize

log = logging.getLogger(__name__)

INSTALL = "uv sync --extra word2vec"  # or `pip install gensim`
__all__ = ["Word2VecConfig", "Vectors", "initial_vectors", "load_vectors", "train_captions", "train_word2vec"]
SOURCES = ("random", "word2vec")  # anything else is the path of a vectors file
FORMATS = {"binary": "word2vec binary", "text": "word2vec text", "glove": "GloVe text"}
# compressions recognised by their magic bytes: name, opener, and the suffix by which gensim's opener
# (smart_open) decompresses them
COMPRESSIONS = {
    b"\x1f\x8b": ("gzip", gzip.open, ".gz"),
    b"BZh": ("bz2", bz2.open, ".bz2"),
    b"\xfd7zXZ\x00": ("xz", lzma.open, ".xz"),
}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_RATIO = 1100  # a compressed file holds at most this many times its size (gzip's limit is ~1032)
SNIFF_BYTES = 1 << 16  # the header and the first vector of any real file fit in this


@dataclass
class Vectors:
    """An initial embedding matrix and what it covers."""

    matrix: np.ndarray  # (V, D) float32, row i for word id i
    source: str  # "word2vec" or the vectors file
    found: int  # vocabulary words (special tokens excluded) that got a vector from the source
    words: int  # vocabulary words, special tokens excluded
    missing: list[str] = field(default_factory=list)  # words without one, most frequent first
    detail: str = ""  # how they were made (format, training settings, time)

    def summary(self) -> str:
        """One line for fit to print."""
        share = self.found / self.words if self.words else 1.0
        line = f"embeddings: {self.detail}; {self.found:,} of {self.words:,} vocabulary words covered ({share:.1%})"
        if self.missing:
            shown = ", ".join(self.missing[:8]) + (", ..." if len(self.missing) > 8 else "")
            line += f", {len(self.missing):,} start random ({shown})"
        return line


def initial_vectors(
    spec: str,
    vocab: Vocabulary,
    captions: Iterable[str],
    dim: int,
    seed: int = 0,
    word2vec: Word2VecConfig | None = None,
) -> Vectors | None:
    """The initial embedding matrix for `--embeddings spec`: None for `random` (keep the model's own init),
    Word2Vec trained on `captions` (the training captions) for `word2vec`, else the vectors file `spec`."""
    if spec == "random":
        return None
    if spec == "word2vec":
        return train_word2vec(vocab, captions, dim, seed, word2vec or Word2VecConfig())
    return load_vectors(spec, vocab, dim, seed)


def train_captions(texts: list[str], owners: np.ndarray, train_rows: np.ndarray) -> list[str]:
    """The captions of the training images only (what Word2Vec may learn from)."""
    is_train = np.zeros(int(max(owners.max(initial=-1), train_rows.max(initial=-1))) + 1, dtype=bool)
    is_train[train_rows] = True
    return [t for t, o in zip(texts, owners, strict=True) if is_train[o]]


def _gensim(what: str) -> ModuleType:
    """The gensim package, or a UserError that says how to install it."""
    try:
        import gensim
    except ImportError:
        raise UserError(
            f"{what} needs gensim, an optional extra: install it with `{INSTALL}` (or `pip install gensim`)"
        ) from None
    return gensim


@contextlib.contextmanager
def _quiet_gensim() -> Iterator[None]:
    """gensim logs warnings (duplicate words, tiny corpora) through Python's last-resort handler, as raw
    stderr lines: keep them out of fit's output while it runs."""
    logger = logging.getLogger("gensim")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- Word2Vec on the training captions ---------------------------------------------------------------------


def sentences(vocab: Vocabulary, captions: Iterable[str]) -> list[list[str]]:
    """Captions as the decoder reads them: vocabulary words, the others as <unk>, between <start> and <end>."""
    return [[START, *(w if w in vocab.stoi else UNK for w in tokenize(c)), END] for c in captions]


def train_word2vec(vocab: Vocabulary, captions: Iterable[str], dim: int, seed: int, cfg: Word2VecConfig) -> Vectors:
    """Word2Vec vectors of dimension `dim` for the vocabulary, trained on `captions` (one worker thread: the
    same vectors for the same seed)."""
    gensim = _gensim("--embeddings word2vec")
    corpus = sentences(vocab, captions)
    tokens = sum(len(s) for s in corpus)
    if tokens == 0:
        raise UserError("--embeddings word2vec: the training captions hold no words")
    t0 = time.perf_counter()
    with _quiet_gensim():
        model = gensim.models.Word2Vec(
            sentences=corpus,
            vector_size=dim,
            min_count=1,  # rare words are already <unk>
            sg=int(cfg.sg),
            window=cfg.window,
            negative=cfg.negative,
            epochs=cfg.epochs,
            sample=cfg.sample,
            seed=seed,
            workers=1,
        )
    wv = model.wv
    detail = (
        f"word2vec trained on {len(corpus):,} train captions ({tokens:,} tokens; "
        f"{'skip-gram' if cfg.sg else 'CBOW'}, window {cfg.window}, {cfg.epochs} epochs, {dim}-d) "
        f"in {time.perf_counter() - t0:.1f}s, centred, RMS 1"
    )
    vectors = _assemble(vocab, dim, seed, lambda w: wv.key_to_index.get(w), wv.vectors, "word2vec", detail)
    vectors.matrix = centred(vectors.matrix)
    return vectors


def centred(matrix: np.ndarray) -> np.ndarray:
    """The mean vector removed, then one factor so that the values' RMS is 1, nn.Embedding's N(0, 1) scale.

    Word2Vec vectors trained on captions are small (RMS ~0.1) and share one direction (two words' mean
    cosine similarity 0.6-0.9): as they are, the decoder sees nearly the same input for every word and
    trained slower than from random vectors. Centred and scaled, the same vectors trained faster than random
    ones on Flickr30k captions (BENCHMARKS.md). The directions between words are kept."""
    m = matrix - matrix.mean(axis=0)
    rms = float(np.sqrt(np.mean(np.square(m))))
    return m / rms if rms > 0 else m


# -- a vectors file -------------------------------------------------------------------------------------------


def load_vectors(path: str | Path, vocab: Vocabulary, dim: int, seed: int = 0) -> Vectors:
    """The vocabulary's vectors from a word2vec (binary or text) or GloVe (text) file of dimension `dim`.

    Every problem with the file (missing, empty, garbage, truncated, another dimension, NaN values) is a
    UserError naming it; nothing in it is unpickled or executed."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"vectors file not found: {path} (--embeddings takes random, word2vec or the path of a "
            "word2vec/GloVe vectors file)"
        )
    if not path.is_file():
        raise UserError(f"--embeddings {path} is not a file")
    gensim = _gensim(f"--embeddings {path}")
    fmt, count, file_dim = sniff(path)
    if file_dim != dim:
        raise UserError(f"{path} holds {file_dim}-dimensional vectors, but the embedding size is {dim}")
    t0 = time.perf_counter()
    try:
        with _quiet_gensim(), _named_by_content(path) as name:
            kv = gensim.models.KeyedVectors.load_word2vec_format(
                name,
                binary=fmt == "binary",
                no_header=fmt == "glove",
                unicode_errors="replace",  # a word cut mid-character cannot match the vocabulary anyway
            )
    except MemoryError:
        raise UserError(f"{path} is too large to load into memory") from None
    except UserError:
        raise
    except Exception as e:  # gensim and numpy raise ValueError, EOFError, UnicodeDecodeError, ... on bad files
        bad = _bad_line(path, fmt, dim) if fmt != "binary" else None
        if bad is not None:  # numpy's "could not broadcast input array from shape (299,)" says none of this
            line, word, values = bad
            raise UserError(
                f"{path}: line {line} ({word!r}) holds {values} values, not {dim} (a damaged file, or a word "
                "with spaces inside)"
            ) from None
        raise UserError(f"cannot read {FORMATS[fmt]} vectors from {path}: {describe(e)}") from None
    if kv.vectors.ndim != 2 or kv.vectors.shape[1] != dim or len(kv) == 0:
        raise UserError(f"{path} holds no {dim}-dimensional vectors")
    if count is not None and _holds_more(path, fmt, count, dim):
        log.warning(
            f"{path}: its header announces {count:,} vectors, but it holds more: only the first {count:,} are read"
        )
    lookup = _lookup(kv.key_to_index, kv.index_to_key)
    detail = f"{len(kv):,} {FORMATS[fmt]} vectors from {path} ({dim}-d, read in {time.perf_counter() - t0:.1f}s)"
    return _assemble(vocab, dim, seed, lookup, kv.vectors, str(path), detail, check=True)


def sniff(path: Path) -> tuple[str, int | None, int]:
    """(format, vectors the header announces or None, dimension) from the start of the file.

    word2vec files start with a `COUNT DIM` line; then text files hold `word v1 .. vDIM` lines and binary
    ones `word ` and DIM raw float32. GloVe files have no header: every line is a word and its values."""
    try:
        with _open_vectors(path) as f:
            head = f.read(SNIFF_BYTES)
    except UserError:
        raise
    except Exception as e:  # a damaged gzip, bz2 or xz stream, an unreadable file...
        raise UserError(f"cannot read vectors file {path}: {describe(e)}") from None
    if not head.strip():
        raise UserError(f"vectors file {path} is empty")
    first, _, rest = head.partition(b"\n")
    fields = _text_fields(first)
    if fields is None:
        raise UserError(f"{path} is not a word2vec or GloVe vectors file (its first line is not text)")
    if len(fields) == 2 and all(_is_int(x) for x in fields):
        count, dim = int(fields[0]), int(fields[1])
        if count <= 0 or dim <= 0:
            raise UserError(f"{path}: its header announces {count} vectors of dimension {dim}")
        entry = rest.partition(b"\n")[0]
        fmt = "text" if _is_entry(_text_fields(entry), dim) else "binary"
        _check_size(path, fmt, count, dim)
        return fmt, count, dim
    if len(fields) >= 2 and _is_entry(fields, len(fields) - 1):
        return "glove", None, len(fields) - 1
    raise UserError(
        f"{path} is not a word2vec or GloVe vectors file (its first line is neither `COUNT DIM` nor a word "
        "followed by numbers)"
    )


def _compression(path: Path) -> tuple[str, Callable, str] | None:
    """(name, opener, suffix) of the file's compression, from its first bytes; None when it is not compressed."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(ZSTD_MAGIC):
        raise UserError(f"{path} is zstd-compressed, which is not read here: decompress it (`zstd -d`) or use gzip")
    return next((c for m, c in COMPRESSIONS.items() if magic.startswith(m)), None)


def _open_vectors(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its content is gzip, bz2 or xz (whatever its name)."""
    compression = _compression(path)
    return compression[1](path, "rb") if compression else open(path, "rb")


@contextlib.contextmanager
def _named_by_content(path: Path) -> Iterator[str]:
    """A name for `path` that tells gensim's opener (smart_open, which goes by the suffix) the compression that
    the content has: a symlink in a temporary folder, `vectors.gz` for gzip content, `vectors.txt` for plain
    text, whatever the file is called. No data is copied. (gensim's loader takes a file name, and opens it
    twice for GloVe files, so an open stream cannot be passed instead.)"""
    compression = _compression(path)
    suffix = compression[2] if compression else ".txt"
    with tempfile.TemporaryDirectory(prefix="captioner-vectors-") as folder:
        link = Path(folder) / f"vectors{suffix}"
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # no symlinks here: the name must then say the truth
            if path.suffix.lower() != suffix and (compression or path.suffix.lower() in (".gz", ".bz2", ".xz")):
                raise UserError(f"{path}: its name does not match its content; rename it to end in {suffix}") from None
            link = path.resolve()
        yield str(link)  # absolute: never taken for a URL by smart_open


def _bad_line(path: Path, fmt: str, dim: int) -> tuple[int, str, int] | None:
    """(line number, word, values) of the first line of a text vectors file without `dim` values, or None."""
    try:
        with _open_vectors(path) as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and fmt == "text":
                    continue  # the `COUNT DIM` header
                fields = raw.decode("utf-8", "replace").rstrip().split(" ")
                if raw.strip() and len(fields) - 1 != dim:
                    return number, fields[0], len(fields) - 1
    except Exception:  # the file cannot be read again: gensim's message will do
        return None
    return None


def _holds_more(path: Path, fmt: str, count: int, dim: int) -> bool:
    """Whether a word2vec file holds more than the `count` vectors its header announces (gensim reads `count`
    and stops): a second pass over the file, reading the vectors' bytes without parsing them."""
    with _open_vectors(path) as f:
        f.readline()  # the header
        if fmt == "text":
            for _ in range(count):
                if not f.readline():
                    return False
            return any(line.strip() for line in f)
        data, pos, entry = b"", 0, 4 * dim  # binary: `word ` then dim float32, then maybe a newline
        for _ in range(count):
            space = data.find(b" ", pos)
            while space < 0 or space + 1 + entry > len(data):
                chunk = f.read(1 << 20)
                if not chunk:
                    return False
                data, pos = data[pos:] + chunk, 0
                space = data.find(b" ")
            pos = space + 1 + entry
        if data[pos:].strip():
            return True
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))


def _text_fields(line: bytes) -> list[str] | None:
    try:
        return line.decode("utf-8").split()
    except UnicodeDecodeError:
        return None


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _is_entry(fields: list[str] | None, dim: int) -> bool:
    """`word v1 .. vdim` with numbers for the values."""
    if fields is None or len(fields) != dim + 1:
        return False
    try:
        [float(x) for x in fields[1:]]
    except ValueError:
        return False
    return True


def _check_size(path: Path, fmt: str, count: int, dim: int) -> None:
    """Refuse a header that announces more vectors than the file can hold, before gensim allocates them."""
    size = path.stat().st_size * (MAX_RATIO if _compression(path) else 1)
    smallest = (2 + 4 * dim) if fmt == "binary" else (2 + 2 * dim)  # `w ` + floats / `w` + ` 0` x dim + newline
    if count * smallest > size:
        raise UserError(
            f"{path}: its header announces {count:,} vectors of dimension {dim}, more than the file can hold "
            "(truncated, or not a vectors file)"
        )


def _lookup(key_to_index: dict, index_to_key: list) -> Callable[[str], int | None]:
    """word -> row in the file: the word itself, else its first lowercase match in NFC (cased files such as
    GoogleNews hold `Dog` and `dog`; the vocabulary is lowercase and NFC, a file's words may be NFD)."""
    lower: dict[str, int] | None = None

    def find(word: str) -> int | None:
        nonlocal lower
        i = key_to_index.get(word)
        if i is not None:
            return i
        if lower is None:
            lower = {}
            for j, key in enumerate(index_to_key):
                lower.setdefault(unicodedata.normalize("NFC", str(key)).lower(), j)
        return lower.get(word)

    return find


def _assemble(
    vocab: Vocabulary,
    dim: int,
    seed: int,
    find: Callable[[str], int | None],
    source_vectors: np.ndarray,
    source: str,
    detail: str,
    check: bool = False,
) -> Vectors:
    """The (V, dim) matrix: the source's vector for each word it has, a random one of the same scale for the
    others (seeded)."""
    rows, picks = [], []
    for i, word in enumerate(vocab.itos):
        j = find(word)
        if j is not None:
            rows.append(i)
            picks.append(j)
    found = np.asarray(source_vectors[np.asarray(picks, dtype=np.int64)], dtype=np.float32).reshape(-1, dim)
    if check:
        _check_values(found, [vocab.itos[i] for i in rows], source)
    scale = float(found.std()) if found.size > 1 else 1.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((len(vocab), dim)) * scale).astype(np.float32)
    matrix[np.asarray(rows, dtype=np.int64)] = found
    have = set(rows)
    missing = [w for i, w in enumerate(vocab.itos) if i not in have and w not in SPECIALS]
    words = len(vocab) - len(SPECIALS)
    return Vectors(matrix, source, words - len(missing), words, missing, detail)


def _check_values(found: np.ndarray, words: list[str], source: str) -> None:
    """NaN or infinite values, and text lines that held a single value (gensim broadcasts it over the row)."""
    bad = ~np.isfinite(found).all(axis=1)
    if bad.any():
        raise UserError(f"{source}: the vector of {words[int(np.argmax(bad))]!r} holds NaN or infinite values")
    if found.shape[1] > 1:
        flat = (found == found[:, :1]).all(axis=1) & (found[:, 0] != 0)
        if flat.any():
            raise UserError(
                f"{source}: the line of {words[int(np.argmax(flat))]!r} holds one value, not {found.shape[1]}"
                " (a damaged or truncated file)"
            )
