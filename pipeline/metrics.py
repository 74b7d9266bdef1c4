"""Caption metrics exactly as the coco-caption toolkit computes them (pycocoevalcap).

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D on a whole split in one call (CIDEr-D's document frequencies come
from the references of that split). The PTB tokenizer and METEOR run on Java; without Java, captions are
tokenised by a Python stand-in for the PTB rules (lowercase, punctuation split off and removed), METEOR is
left out, and the result says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
import unicodedata
from functools import lru_cache

from pipeline.errors import UserError, describe

log = logging.getLogger(__name__)

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
# On lowercase ASCII this is [a-z0-9]+(?:'[a-z]+)?|'[a-z]+|\.\.\.|--|[^\sa-z0-9]; beyond ASCII, letters of
# every script are word characters (`café` is one word, as the PTB tokenizer has it, not `caf` and `é`).
_SPLIT = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?|'[^\W\d_]+|\.\.\.|--|[^\s\w]|_")


class JavaError(Exception):
    """Java is on PATH but could not run one of pycocoevalcap's jars."""


@lru_cache(maxsize=1)
def java_problem() -> str | None:
    """None when a `java` on PATH runs the PTB tokenizer jar; otherwise why not, in a few words. A `java`
    that answers `-version` is not enough: a broken or foreign one may not run the jars."""
    java = shutil.which("java")
    if not java:
        return "no `java` on PATH"
    try:
        if subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode != 0:
            return f"`{java} -version` fails"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{java} -version` fails ({describe(e)})"
    try:
        _ptb_tokenize({0: [{"caption": "A test."}]})
    except JavaError as e:
        return f"`{java}` cannot run the PTB tokenizer ({e})"
    return None


def java_available() -> bool:
    """Whether METEOR and the PTB tokenizer can run (see `java_problem`)."""
    return java_problem() is None


def simple_tokenize(text: str) -> str:
    """Lowercase, split punctuation off, drop the PTB tokenizer's punctuation tokens (text compared in NFC)."""
    return " ".join(t for t in _SPLIT.findall(_nfc(text).lower()) if t not in _PUNCTUATION)


def _nfc(text: str) -> str:
    """Captions are compared in Unicode NFC: a reference stored as `cafe` + U+0301 says the model's `café`."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)


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


def _ptb_tokenize(captions: dict) -> dict:
    """pycocoevalcap's PTB tokenizer (a Java process). It fails quietly, returning fewer lines than it was
    given, or in many other ways: any of them is a JavaError."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        with _quiet_stderr():
            out = PTBTokenizer().tokenize(captions)
    except Exception as e:  # Popen, decoding, its temp file: whatever went wrong, Java did not tokenise
        raise JavaError(describe(e)) from None
    lost = out.keys() != captions.keys() or any(len(out[k]) != len(v) for k, v in captions.items())
    words_in = any(simple_tokenize(c["caption"]) for v in captions.values() for c in v)
    if lost or (words_in and not any(t for v in out.values() for t in v)):  # a java that printed nothing
        raise JavaError("it returned no tokens")
    return out


def _simple_tokenize(captions: dict) -> dict:
    return {k: [simple_tokenize(c["caption"]) for c in v] for k, v in captions.items()}


def _meteor(gts: dict, res: dict) -> float:
    """METEOR 1.5 (a Java process, -Xmx2G). A failure is a JavaError, and the process is ended either way."""
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        meteor = Meteor()
    except Exception as e:  # Popen
        raise JavaError(describe(e)) from None
    try:
        return float(meteor.compute_score(gts, res)[0])
    except Exception as e:  # a dead process: BrokenPipeError, or float('') from an empty answer
        raise JavaError(describe(e)) from None
    finally:
        # compute_score keeps its lock when it fails, and Meteor.__del__ would then wait for it forever
        if meteor.lock.locked():
            meteor.lock.release()
        with contextlib.suppress(OSError):
            meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def score(candidates: list[str], references: list[list[str]], java: bool | None = None) -> dict:
    """Corpus scores (0-1 scale) of one candidate per image against that image's references.

    `java=None` uses Java when it works, and goes on without it (with a warning) when it fails midway;
    `java=True` makes Java required: without it, or when it fails, a UserError. The result has the metric
    names of the contract, and `tokenizer`: "ptb" or "simple (Python, not PTB-tokenised)"."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) != len(references) or not candidates:
        raise ValueError("need one candidate per image, and at least one image")
    have_java = java_available()
    if java and not have_java:
        raise UserError(f"METEOR and the PTB tokenizer need Java: {java_problem() or 'no working `java` on PATH'}")
    use_java = have_java if java is None else bool(java)
    gts = {i: [{"caption": _nfc(r)} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": _nfc(c)}] for i, c in enumerate(candidates)}
    tokenizer = "ptb" if use_java else "simple (Python, not PTB-tokenised)"
    try:
        gts_tok, res_tok = (_ptb_tokenize(gts), _ptb_tokenize(res)) if use_java else (None, None)
    except JavaError as e:
        _java_failed(java, "the PTB tokenizer", e, "the captions are tokenised in Python, METEOR is left out")
        use_java, tokenizer = False, "simple (Python, not PTB-tokenised)"
    if not use_java:
        gts_tok, res_tok = _simple_tokenize(gts), _simple_tokenize(res)
    res_tok = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res_tok.items()}  # scorers reject empty strings
    out: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts_tok, res_tok)
        out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        if use_java:
            try:
                out["METEOR"] = _meteor(gts_tok, res_tok)
            except JavaError as e:
                _java_failed(java, "METEOR", e, "METEOR is left out")
        out["ROUGE-L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
        out["CIDEr-D"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    out["tokenizer"] = tokenizer
    return out


def _java_failed(required: bool | None, what: str, error: JavaError, consequence: str) -> None:
    if required:
        raise UserError(f"METEOR was asked for (--meteor), but Java failed to run {what}: {error}")
    log.warning(f"Java failed to run {what} ({error}): {consequence}")


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """CIDEr-D alone with the Python tokenisation, by pycocoevalcap: the oracle that fit's validation score,
    `pipeline.cider.corpus_score`, is tested against."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokenize(c) or "<empty>"] for i, c in enumerate(candidates)}
    return float(Cider().compute_score(gts, res)[0])
