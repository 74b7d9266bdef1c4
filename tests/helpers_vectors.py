"""Vectors files for the embedding tests, written byte by byte as the word2vec C tool and GloVe write them (not
with gensim's writer, so that the loader is tested against the formats rather than against itself)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pipeline.embeddings import INSTALL

try:
    import gensim  # noqa: F401

    HAVE_GENSIM = True
except ImportError:
    HAVE_GENSIM = False
needs_gensim = pytest.mark.skipif(
    not HAVE_GENSIM,
    reason=f"gensim is not installed: `uv sync` installs it with the dev group (for users an extra: {INSTALL})",
)


def write_vectors(path: Path, words: list[str], vectors: np.ndarray, fmt: str, count: int | None = None) -> Path:
    """A vectors file as the tools write it: `binary` and `text` (word2vec, with a `COUNT DIM` header) or
    `glove` (text, no header). `count` overrides the header's count. A `.gz` name is gzip-compressed."""
    n, dim = vectors.shape
    header = f"{n if count is None else count} {dim}\n".encode()
    if fmt == "binary":
        pairs = zip(words, vectors, strict=True)
        data = header + b"".join(w.encode() + b" " + v.astype("<f4").tobytes() + b"\n" for w, v in pairs)
    else:
        lines = "".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in zip(words, vectors, strict=True))
        data = (header if fmt == "text" else b"") + lines.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path
