"""Caption metrics exactly as the coco-caption toolkit computes them (pycocoevalcap).

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D on a whole split in one call (CIDEr-D's document frequencies come
from the references of that split). The PTB tokenizer and METEOR run on Java; without Java, captions are
tokenised by a Python stand-in for the PTB rules (lowercase, punctuation split off and removed), METEOR is
left out, and the result says so.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from functools import lru_cache

from pipeline.errors import UserError

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")  # as in --out's JSON

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising
_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_SPLIT = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|'[a-z]+|\.\.\.|--|[^\sa-z0-9]")


@lru_cache(maxsize=1)
def java_available() -> bool:
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def simple_tokenize(text: str) -> str:
    """Lowercase, split punctuation off, drop the PTB tokenizer's punctuation tokens."""
    return " ".join(t for t in _SPLIT.findall(text.lower()) if t not in _PUNCTUATION)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the Java tokenizer's progress lines, which it writes straight to file descriptor 2."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(gts: dict, res: dict, use_java: bool) -> tuple[dict, dict]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        with _quiet_stderr():
            return tok.tokenize(gts), tok.tokenize(res)
    return (
        {k: [simple_tokenize(c["caption"]) for c in v] for k, v in gts.items()},
        {k: [simple_tokenize(c["caption"]) for c in v] for k, v in res.items()},
    )


def score(candidates: list[str], references: list[list[str]], java: bool | None = None) -> dict:
    """Corpus scores (0-1 scale) of one candidate per image against that image's references.

    `java=None` uses Java when it is installed; `java=True` without Java is a UserError. The result has
    the metric names of the contract, and `tokenizer`: "ptb" or "simple (no Java: not PTB-tokenised)"."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) != len(references) or not candidates:
        raise ValueError("need one candidate per image, and at least one image")
    have_java = java_available()
    if java and not have_java:
        raise UserError("METEOR and the PTB tokenizer need Java, and no working `java` is on PATH")
    use_java = have_java if java is None else bool(java)
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c}] for i, c in enumerate(candidates)}
    gts, res = _tokenize(gts, res, use_java)
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}  # scorers reject empty strings
    out: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()  # a Java subprocess, ended by its __del__
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
            del meteor
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    out["tokenizer"] = "ptb" if use_java else "simple (no Java: not PTB-tokenised)"
    return out


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """CIDEr-D alone with the Python tokenisation: fit's fast validation score."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokenize(c) or "<empty>"] for i, c in enumerate(candidates)}
    return float(Cider().compute_score(gts, res)[0])
