"""Reading captioned image sets: Karpathy JSON, Flickr8k token files, Kaggle Flickr30k/Flickr8k CSVs.

`find_captions(images_dir)` picks the captions file; `read_captions(images_dir, path)` returns a
`CaptionSet`: every image name (relative to the images folder), its captions and its split, plus
counts of what was repaired or skipped. Real files have defects; these readers repair what is
unambiguous (a missing separator, a `.jpg.1` name that is not on disk), skip the rest, and count both.

Captions and file names are compared in Unicode NFC: a name listed as `résumé.jpg` (NFC) finds the file stored
as `re\u0301sume\u0301.jpg` (NFD, as macOS writes names), and the image keeps the name it has on disk, so that
it opens. Captions are kept in NFC.

Every text file (captions, split files) is read as UTF-8 with or without a byte-order mark (`utf-8-sig`):
editors on Windows write one, and it must not hide the first row. Whatever bytes a captions file holds,
reading it ends in a `CaptionSet` or a `UserError`, never another exception (property-tested).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError, describe

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Recognised captions files, best first: a file that carries its own split wins.
KARPATHY_NAMES = ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")
LAYOUTS = {
    "karpathy": KARPATHY_NAMES + tuple(n + ".gz" for n in KARPATHY_NAMES),
    "flickr8k-token": ("Flickr8k.token.txt",),
    "kaggle-flickr30k": ("results.csv",),
    "kaggle-flickr8k": ("captions.txt",),
}
RECOGNISED = ", ".join(n for names in LAYOUTS.values() for n in names if not n.endswith(".gz"))
HEAD_CHARS = 65536  # how much of an unknown file's first line is read to recognise its layout
# What reading a damaged or foreign file can raise: I/O and gzip errors (OSError, EOFError, zlib.error),
# undecodable text and bad JSON (ValueError), a CSV field past csv's limit, JSON nested past the stack.
READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, csv.Error, RecursionError)
MALFORMED = "malformed caption rows"


@dataclass
class CaptionSet:
    """Captions of an image set. `images[i]` is a path relative to the images folder (POSIX style)."""

    images: list[str]
    captions: list[list[str]]
    splits: list[str]
    layout: str
    source: Path
    problems: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.images)


def find_captions(images_dir: Path) -> tuple[Path, str]:
    """Find a recognised captions file in `images_dir` or one folder down; prefer one with a split."""
    if not images_dir.is_dir():
        raise UserError(f"images folder not found: {images_dir}")
    folders = [images_dir] + sorted(p for p in images_dir.iterdir() if p.is_dir())
    for layout, names in LAYOUTS.items():
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name, layout
    raise UserError(
        f"no captions file found in {images_dir} or one folder down; recognised: {RECOGNISED} (or pass --captions FILE)"
    )


def detect_layout(path: Path) -> str:
    """The layout of a captions file given by the user, from its name and then its first line."""
    for layout, names in LAYOUTS.items():
        if path.name in names:
            return layout
    if path.suffix == ".json" or path.name.endswith(".json.gz"):
        return "karpathy"
    with _open_text(path) as f:
        head = f.readline(HEAD_CHARS)
    if "|" in head and "image_name" in head:
        return "kaggle-flickr30k"
    if re.match(r"^[^\t]+#\d+ *\t", head):
        return "flickr8k-token"
    if head.lower().startswith("image,"):
        return "kaggle-flickr8k"
    raise UserError(f"unrecognised captions file {path}; recognised layouts: {RECOGNISED}")


def read_captions(images_dir: Path, captions: Path | None = None) -> CaptionSet:
    """Read the captions of the images in `images_dir`, from `captions` or the file found there."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        if images_dir.exists():
            raise UserError(f"images folder {images_dir} is a file, not a folder")
        raise UserError(f"images folder not found: {images_dir}")
    path = Path(captions) if captions is not None else images_dir
    problems: Counter = Counter()
    try:
        if captions is None:
            path, layout = find_captions(images_dir)
        elif path.is_dir():
            raise UserError(f"captions file {path} is a folder, not a file")
        elif not path.is_file():
            raise UserError(f"captions file not found: {path}")
        else:
            layout = detect_layout(path)
        entries = READERS[layout](path, problems)
    except READ_ERRORS as e:
        raise UserError(f"cannot read captions file {path}: {_why(e)}") from None
    if not entries:
        raise UserError(f"no usable captions in {path} (read as {layout})")
    try:
        return _resolve(images_dir, path, layout, entries, problems)
    except OSError as e:
        raise UserError(f"cannot read images folder {images_dir}: {_why(e)}") from None


def _why(e: BaseException) -> str:
    """A read error in a few words, on one line."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{e.object[e.start]:02x})"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return describe(e)


@dataclass
class _Entry:
    captions: list[str] = field(default_factory=list)
    split: str | None = None
    folder: str = ""  # Karpathy COCO `filepath`, e.g. "val2014"


def _open_text(path: Path) -> io.TextIOBase:
    """A text file (gzip-compressed when it ends in .gz) as UTF-8, a leading byte-order mark dropped."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # from JSON escapes like "\ud800": not encodable as UTF-8


def _clean(text: str) -> str:
    """One caption on one line, in NFC: control characters become spaces, runs of white space one space, and
    lone surrogates U+FFFD (the store holds UTF-8)."""
    return _nfc(" ".join(_SURROGATE.sub("\ufffd", _CONTROL.sub(" ", text)).split()))


def _nfc(text: str) -> str:
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def read_karpathy(path: Path, problems: Counter) -> dict[str, _Entry]:
    """Karpathy's `dataset_*.json`: `images[].filename`, optional `filepath`, `split`, `sentences[].raw`
    (or `tokens`). Entries of the wrong shape are counted as malformed rows, never fatal."""
    with _open_text(path) as f:
        data = json.load(f)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path} is not a Karpathy dataset file (no 'images' list)")
    entries: dict[str, _Entry] = {}
    for item in images:
        if not isinstance(item, dict):
            problems[MALFORMED] += 1
            continue
        name, folder, sentences = item.get("filename"), item.get("filepath") or "", item.get("sentences", [])
        if not isinstance(name, str) or not name.strip() or not isinstance(folder, str):
            problems[MALFORMED] += 1
            continue
        if not isinstance(sentences, list):
            problems[MALFORMED] += 1
            sentences = []
        split = item.get("split", "train")
        split = "train" if split == "restval" else split
        if split not in SPLITS:
            problems[f"images with unknown split {str(split)[:40]!r} (counted as train)"] += 1
            split = "train"
        key = str(PurePosixPath(folder) / name) if folder else name
        entry = entries.setdefault(key, _Entry(split=split, folder=folder))
        for sentence in sentences:
            text = _karpathy_sentence(sentence)
            if text:
                entry.captions.append(text)
            else:
                problems["empty captions"] += 1
    return entries


def _karpathy_sentence(sentence: object) -> str:
    """The caption of one `sentences[]` entry: its `raw` text, else its `tokens` joined; "" when neither."""
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return _clean(raw)
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return _clean(" ".join(tokens))
    return ""


_TOKEN_ROW = re.compile(r"^(?P<name>[^#\t]+)#(?P<k>\d+)\s+(?P<text>.*)$")  # without a tab: `name.jpg#k caption`
_STRAY_SUFFIX = re.compile(r"^(?P<base>.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)
REPAIRED_NAMES = "repaired image names (x.jpg.N -> x.jpg)"


def _token_row(line: str) -> tuple[str, str] | None:
    """(name, caption) of a `name#k<TAB>caption` line, or None. The name ends at the last `#` before the tab:
    it may hold `#` itself (`a#b.jpg#0`)."""
    head, tab, text = line.partition("\t")
    if tab:
        name, hash_, k = head.rstrip(" ").rpartition("#")
        return (name.strip(), text) if hash_ and k.isdigit() and name.strip() else None
    m = _TOKEN_ROW.match(line)
    return (m.group("name").strip(), m.group("text")) if m else None


def read_flickr8k_token(path: Path, problems: Counter) -> dict[str, _Entry]:
    """Flickr8k's `Flickr8k.token.txt`: `name.jpg#k<TAB>caption` a line."""
    entries: dict[str, _Entry] = defaultdict(_Entry)
    with _open_text(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = _token_row(line.rstrip("\r\n"))
            text = _clean(row[1]) if row else ""
            if not row or not text:
                problems[MALFORMED] += 1
                continue
            entries[row[0]].captions.append(text)
    return dict(entries)


# `image_name| comment_number| comment`; the real file has a row whose second `|` is missing. The name ends
# at the first `| number`, so that it may hold a `|` itself.
_KAGGLE30K_ROW = re.compile(r"^(?P<name>.+?)\s*\|\s*(?P<k>\d+)\s*(?P<sep>\|)?\s*(?P<text>.*)$")


def read_kaggle_flickr30k(path: Path, problems: Counter) -> dict[str, _Entry]:
    """Kaggle's Flickr30k `results.csv`: `image_name| comment_number| comment` a line, after a header."""
    entries: dict[str, _Entry] = defaultdict(_Entry)
    with _open_text(path) as f:
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")
            if i == 0 and line.replace(" ", "").lower().startswith("image_name|"):
                continue
            if not line.strip():
                continue
            m = _KAGGLE30K_ROW.match(line)
            text = _clean(m.group("text")) if m else ""
            if not text:
                problems[MALFORMED] += 1
                continue
            if m.group("sep") is None:
                problems["repaired rows (missing '|' separator)"] += 1
            entries[m.group("name").strip()].captions.append(text)
    return dict(entries)


def read_kaggle_flickr8k(path: Path, problems: Counter) -> dict[str, _Entry]:
    """Kaggle's Flickr8k `captions.txt`: CSV `image,caption` after a header."""
    entries: dict[str, _Entry] = defaultdict(_Entry)
    with _open_text(path) as f:
        reader = csv.reader(f)
        for i, row in enumerate(reader):
            if i == 0 and row and row[0].strip().lower() == "image":
                continue
            if not row:
                continue
            if len(row) < 2 or not row[0].strip():
                problems[MALFORMED] += 1
                continue
            # An unquoted caption with commas splits into extra fields: they belong to the caption.
            text = _clean(",".join(row[1:]))
            if not text:
                problems[MALFORMED] += 1
                continue
            entries[row[0].strip()].captions.append(text)
    return dict(entries)


READERS = {
    "karpathy": read_karpathy,
    "flickr8k-token": read_flickr8k_token,
    "kaggle-flickr30k": read_kaggle_flickr30k,
    "kaggle-flickr8k": read_kaggle_flickr8k,
}


_SPLIT_FILES = {
    "train": ("Flickr_8k.trainImages.txt",),
    "val": ("Flickr_8k.devImages.txt",),
    "test": ("Flickr_8k.testImages.txt",),
}


def _with_split_files(
    entries: dict[PurePosixPath, _Entry], folder: Path, problems: Counter
) -> dict[PurePosixPath, _Entry]:
    """Apply Flickr8k's official split files when they sit next to the captions: one name a line (a name may
    hold spaces), compared in NFC."""
    found = False
    for split, names in _SPLIT_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found = True
                try:
                    with _open_text(folder / name) as f:
                        listed = [line.strip() for line in f.read().splitlines()]
                except READ_ERRORS as e:
                    raise UserError(f"cannot read split file {folder / name}: {_why(e)}") from None
                for line in listed:
                    rel = _safe_relative(_nfc(line)) if line else None
                    if rel in entries:
                        entries[rel].split = split
    if found:
        unlisted = [e for e in entries.values() if e.split is None]
        if unlisted:
            problems["images in no official split file (counted as train)"] += len(unlisted)
            for e in unlisted:
                e.split = "train"
    return entries


def hash_split(name: str) -> str:
    """A deterministic 80/10/10 split decided by the image name alone (not file order, not existence)."""
    name = _nfc(PurePosixPath(name).name)  # the same split however the name's accents are encoded
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:4], "big") % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def _storable(name: str) -> bool:
    """A name the store can hold (UTF-8) and a file system can have (no NUL)."""
    return "\x00" not in name and not _SURROGATE.search(name)


def _safe_relative(name: str) -> PurePosixPath | None:
    """The name as a relative path inside the images folder, or None when it would escape it."""
    name = name.replace("\\", "/")
    p = PurePosixPath(name)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts or not p.parts:
        return None
    return p


def _inside(folder: Path, images_dir: Path) -> Path | None:
    """`folder` spelled from the images folder when it lies inside it, else None. Judged on the path as
    written, or failing that with symlinks resolved; symlinks the user made inside the images folder
    (to files or folders elsewhere) are followed, since names from the captions file cannot make them."""
    base = Path(os.path.abspath(images_dir))
    folder = Path(os.path.abspath(folder))
    for path, root in ((folder, base), (folder.resolve(), base.resolve())):
        try:
            return base / path.relative_to(root)
        except ValueError:
            pass
    return None


def _image_roots(images_dir: Path, captions_path: Path) -> list[Path]:
    """Folders where names from the captions file may live: the images folder, the captions file's
    folder, and their sub-folders (Kaggle keeps images in a sibling such as `flickr30k_images/`)."""
    roots: list[Path] = []
    for base in (images_dir, captions_path.parent):
        for cand in [base] + (sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []):
            cand = _inside(cand, images_dir)
            if cand is not None and cand not in roots:  # only folders inside the images folder
                roots.append(cand)
    return roots


class _Disk:
    """Image files under `root`, found by names compared in NFC: `find` gives the name as it is on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._listings: dict[Path, dict[str, str]] = {}

    def find(self, rel: PurePosixPath) -> PurePosixPath | None:
        if (self.root / rel).is_file():  # the usual case: spelled as on disk
            return rel
        folder, parts = self.root, []
        for part in rel.parts:
            here = folder / part
            if not here.exists():
                actual = self._listing(folder).get(_nfc(part))
                if actual is None:
                    return None
                here = folder / actual
            parts.append(here.name)
            folder = here
        return PurePosixPath(*parts) if folder.is_file() else None

    def _listing(self, folder: Path) -> dict[str, str]:
        """NFC name -> the name on disk, of the entries of `folder` (read once)."""
        if folder not in self._listings:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            listing: dict[str, str] = {}
            for name in names:
                listing.setdefault(_nfc(name), name)
            self._listings[folder] = listing
        return self._listings[folder]


def _pick_root(images_dir: Path, captions_path: Path, names: Iterable[PurePosixPath]) -> Path:
    names = list(names)
    sample = names[:: max(len(names) // 200, 1)][:200]
    best, best_hits = Path(os.path.abspath(images_dir)), -1
    for root in _image_roots(images_dir, captions_path):
        disk = _Disk(root)
        hits = sum(disk.find(n) is not None for n in sample)
        if hits > best_hits:
            best, best_hits = root, hits
    return best


def _repair_stray_names(
    entries: dict[PurePosixPath, _Entry], disk: _Disk, problems: Counter
) -> dict[PurePosixPath, _Entry]:
    """Flickr8k's stray `x.jpg.1` entry names `x.jpg`, when no file `x.jpg.1` exists: then its captions join
    `x.jpg`'s (in file order), counted. A real file called `x.jpg.1` keeps its name."""
    out: dict[PurePosixPath, _Entry] = {}
    for rel, entry in entries.items():
        m = _STRAY_SUFFIX.match(rel.name)
        if m and disk.find(rel) is None:
            problems[REPAIRED_NAMES] += 1
            rel = rel.with_name(m.group("base"))
        _join(out, rel, entry)
    return out


def _join(out: dict, key: object, entry: _Entry) -> None:
    """Add `entry` to `out` under `key`; when the key is there already, its captions join that entry's (in file
    order) and the first split given wins."""
    if key in out:
        out[key].captions.extend(entry.captions)
        out[key].split = out[key].split or entry.split
    else:
        out[key] = entry


def _merge_nfc(entries: dict[str, _Entry]) -> dict[str, _Entry]:
    """The entries keyed by NFC name: an image listed once in NFC and once in NFD is one image."""
    out: dict[str, _Entry] = {}
    for name, entry in entries.items():
        _join(out, _nfc(name), entry)
    return out


def _resolve(images_dir: Path, path: Path, layout: str, entries: dict[str, _Entry], problems: Counter) -> CaptionSet:
    safe: dict[PurePosixPath, _Entry] = {}
    for name, entry in _merge_nfc(entries).items():
        if not _storable(name):
            problems[MALFORMED] += 1
            continue
        rel = _safe_relative(name)
        if rel is None:
            problems["names outside the images folder (rejected)"] += 1
            continue
        if not entry.captions:
            problems["images with no captions"] += 1
            continue
        safe[rel] = entry
    root = _pick_root(images_dir, path, safe)
    disk = _Disk(root)
    safe = _repair_stray_names(safe, disk, problems)
    if layout in ("flickr8k-token", "kaggle-flickr8k"):
        safe = _with_split_files(safe, path.parent, problems)
    base = Path(os.path.abspath(images_dir))  # `root` is spelled from it; `rel` has no `..`
    images, captions, splits = [], [], []
    for rel in sorted(safe, key=str):
        on_disk = disk.find(rel)
        if on_disk is None:
            problems["captioned images missing on disk"] += 1
            continue
        full = root / on_disk
        entry = safe[rel]
        images.append(full.relative_to(base).as_posix())
        captions.append(entry.captions)
        splits.append(entry.split or hash_split(str(rel)))
        n = len(entry.captions)
        if n != 5 and layout != "karpathy":
            problems[f"images with {n} captions (kept)"] += 1
    problems["images on disk with no caption (not extracted)"] += _count_uncaptioned(root, set(images), base)
    return CaptionSet(images, captions, splits, layout, path, problems)


def _count_uncaptioned(root: Path, captioned: set[str], base: Path) -> int:
    count = 0
    try:
        with os.scandir(root) as it:
            for e in it:
                if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                    rel = (root / e.name).relative_to(base).as_posix()
                    count += rel not in captioned
    except OSError:
        pass
    return count
