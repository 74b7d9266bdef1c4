"""Reading captioned image sets: every recognised layout, the repairs and rejections, splits, real files."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.datasets import (
    find_captions,
    hash_split,
    read_captions,
    read_flickr8k_token,
)
from pipeline.errors import UserError

MISSING_SEP = "repaired rows (missing '|' separator)"
REPAIRED_NAME = "repaired image names (x.jpg.N -> x.jpg)"
OUTSIDE = "names outside the images folder (rejected)"
MISSING = "captioned images missing on disk"
UNCAPTIONED = "images on disk with no caption (not extracted)"
UNLISTED = "images in no official split file (counted as train)"
MALFORMED = "malformed caption rows"


def touch(folder: Path, names) -> None:
    """Empty files standing in for images: reading captions never decodes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()


def by_image(cs) -> dict[str, tuple[list[str], str]]:
    return {name: (caps, split) for name, caps, split in zip(cs.images, cs.captions, cs.splits, strict=True)}


def token_lines(rows) -> str:
    return "".join(f"{name}#{k}\t{text}\n" for name, k, text in rows)


# --- Kaggle Flickr30k results.csv ------------------------------------------------------------------------------

KAGGLE30K = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .
1000092795.jpg| 1| Two young , White males are outside near many bushes .
10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .
2199200615.jpg| 0| A dog runs across the grass .
2199200615.jpg| 4   A dog runs across the grass with a stick .
"""


def kaggle_flickr30k(root: Path) -> Path:
    """Kaggle's layout: flickr30k_images/results.csv next to flickr30k_images/flickr30k_images/*.jpg."""
    top = root / "flickr30k_images"
    touch(top / "flickr30k_images", ["1000092795.jpg", "10002456.jpg", "2199200615.jpg"])
    (top / "results.csv").write_text(KAGGLE30K, encoding="utf-8")
    return top


def test_kaggle_flickr30k_results_csv_with_images_in_sibling_subfolder(tmp_path):
    top = kaggle_flickr30k(tmp_path)
    cs = read_captions(top)
    assert cs.layout == "kaggle-flickr30k"
    assert cs.source == top / "results.csv"
    imgs = by_image(cs)
    assert sorted(imgs) == [
        "flickr30k_images/1000092795.jpg",
        "flickr30k_images/10002456.jpg",
        "flickr30k_images/2199200615.jpg",
    ]
    assert imgs["flickr30k_images/1000092795.jpg"][0] == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        "Two young , White males are outside near many bushes .",
    ]
    # The row with the missing second `|` is repaired (comment number dropped, caption kept) and counted.
    assert imgs["flickr30k_images/2199200615.jpg"][0] == [
        "A dog runs across the grass .",
        "A dog runs across the grass with a stick .",
    ]
    assert cs.problems[MISSING_SEP] == 1
    assert "image_name" not in " ".join(cs.images)  # the header is not an image
    # No split in this layout: the deterministic hash split of the file name.
    assert all(split == hash_split(Path(name).name) for name, (_, split) in imgs.items())


def test_captions_file_found_one_folder_down(tmp_path):
    top = kaggle_flickr30k(tmp_path)
    path, layout = find_captions(tmp_path)
    assert (path, layout) == (top / "results.csv", "kaggle-flickr30k")
    cs = read_captions(tmp_path)  # the folder above Kaggle's: images are now two levels down
    assert cs.images == [
        "flickr30k_images/flickr30k_images/1000092795.jpg",
        "flickr30k_images/flickr30k_images/10002456.jpg",
        "flickr30k_images/flickr30k_images/2199200615.jpg",
    ]
    assert cs.problems[MISSING_SEP] == 1
    # The split is decided by the image's name, not by where the folder sits.
    assert cs.splits == read_captions(top).splits


# --- Karpathy JSON ---------------------------------------------------------------------------------------------


def karpathy_coco(root: Path) -> Path:
    items = [
        ("train2014", "COCO_train2014_000000000009.jpg", "train", ["A plate of food .", "Broccoli and meat ."]),
        ("val2014", "COCO_val2014_000000000042.jpg", "restval", ["A dog on a shoe rack ."]),
        ("val2014", "COCO_val2014_000000000073.jpg", "val", ["A motorcycle parked ."]),
        ("val2014", "COCO_val2014_000000000074.jpg", "test", ["A dog lies in the street ."]),
    ]
    images = []
    for i, (folder, name, split, raws) in enumerate(items):
        touch(root / folder, [name])
        sentences = [{"raw": r, "tokens": r.lower().strip(" .").split()} for r in raws]
        images.append({"filepath": folder, "filename": name, "imgid": i, "split": split, "sentences": sentences})
    # a sentence with tokens only is still a caption
    images[2]["sentences"].append({"tokens": ["a", "red", "motorcycle"]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return root


def test_karpathy_coco_layout_with_filepath_and_restval_as_train(tmp_path):
    cs = read_captions(karpathy_coco(tmp_path / "coco"))
    assert cs.layout == "karpathy"
    imgs = by_image(cs)
    assert imgs == {
        "train2014/COCO_train2014_000000000009.jpg": (["A plate of food .", "Broccoli and meat ."], "train"),
        "val2014/COCO_val2014_000000000042.jpg": (["A dog on a shoe rack ."], "train"),  # restval
        "val2014/COCO_val2014_000000000073.jpg": (["A motorcycle parked .", "a red motorcycle"], "val"),
        "val2014/COCO_val2014_000000000074.jpg": (["A dog lies in the street ."], "test"),
    }


def test_karpathy_json_gz_with_images_in_a_subfolder(tmp_path):
    root = tmp_path / "f8k"
    touch(root / "Flicker8k_Dataset", ["a.jpg", "b.jpg"])
    data = {
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A cat ."}]},
            {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "A dog ."}]},
        ]
    }
    with gzip.open(root / "dataset_flickr8k.json.gz", "wt", encoding="utf-8") as f:
        json.dump(data, f)
    cs = read_captions(root)
    assert cs.layout == "karpathy"
    assert by_image(cs) == {
        "Flicker8k_Dataset/a.jpg": (["A cat ."], "test"),
        "Flicker8k_Dataset/b.jpg": (["A dog ."], "val"),
    }


# --- Flickr8k token file ---------------------------------------------------------------------------------------


def test_flickr8k_token_with_official_splits_and_stray_jpg_1_entry(tmp_path):
    root = tmp_path / "f8k"
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "x.jpg"]
    touch(root, names)
    rows = [(n, k, f"{n} caption {k} .") for n in names if n != "x.jpg" for k in range(5)]
    rows += [("x.jpg.1", 0, "people waiting for the subway")]  # the real file's stray entry
    rows += [("x.jpg", k, f"x caption {k} .") for k in range(1, 5)]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows), encoding="utf-8")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\nx.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("d.jpg\n")

    cs = read_captions(root)
    assert cs.layout == "flickr8k-token"
    imgs = by_image(cs)
    assert sorted(imgs) == names  # no "x.jpg.1" image
    assert imgs["x.jpg"][0] == ["people waiting for the subway"] + [f"x caption {k} ." for k in range(1, 5)]
    assert cs.problems[REPAIRED_NAME] == 1
    assert {n: s for n, (_, s) in imgs.items()} == {
        "a.jpg": "train",
        "b.jpg": "train",
        "x.jpg": "train",
        "c.jpg": "val",
        "d.jpg": "test",
        "e.jpg": "train",  # in no split file: counted as train, and reported
    }
    assert cs.problems[UNLISTED] == 1
    assert all(len(c) == 5 for c in cs.captions)
    assert not any("captions (kept)" in k for k in cs.problems)


def test_a_real_x_jpg_1_on_disk_is_not_renamed(tmp_path):
    """`x.jpg.1` was "repaired" to `x.jpg` even when a file `x.jpg.1` exists, and then counted missing. Only a
    name that is not on disk, and whose `x.jpg` is, is repaired; a split file's `y.jpg` still applies to it."""
    root = tmp_path / "f8k"
    touch(root, ["x.jpg.1", "x.jpg", "y.jpg"])
    rows = [("x.jpg.1", 0, "the file called x.jpg.1"), ("x.jpg", 0, "the file called x.jpg")]
    rows += [("y.jpg.1", 0, "a stray entry of y.jpg"), ("y.jpg", 1, "y caption")]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows), encoding="utf-8")
    (root / "Flickr_8k.testImages.txt").write_text("y.jpg\n")
    imgs = by_image(read_captions(root))
    assert imgs == {
        "x.jpg": (["the file called x.jpg"], "train"),
        "x.jpg.1": (["the file called x.jpg.1"], "train"),
        "y.jpg": (["a stray entry of y.jpg", "y caption"], "test"),
    }
    cs = read_captions(root)
    assert cs.problems[REPAIRED_NAME] == 1 and cs.problems[MISSING] == 0 and cs.problems[UNCAPTIONED] == 0


def test_names_with_the_layouts_separator_inside(tmp_path):
    """`a#b.jpg#0<TAB>...` was dropped as malformed (Flickr8k's separator is the last `#`), a split file's
    `my photo.jpg` was read as two names, a `--captions` file starting `my photo.jpg#0<TAB>` was not recognised,
    and Kaggle's results.csv dropped `a|b.jpg| 0| ...`."""
    root = tmp_path / "f8k"
    touch(root, ["a#b.jpg", "my photo.jpg", "c.jpg"])
    rows = [("my photo.jpg", 0, "a photo with a space"), ("a#b.jpg", 0, "the #1 hash"), ("c.jpg", 0, "C #2 tab")]
    tokens = root / "tokens.txt"  # given with --captions: recognised by its first line
    tokens.write_text(token_lines(rows), encoding="utf-8")
    (root / "Flickr_8k.devImages.txt").write_text("my photo.jpg\na#b.jpg\n")
    shutil.copy(tokens, root / "Flickr8k.token.txt")
    for cs in (read_captions(root), read_captions(root, tokens)):
        assert by_image(cs)["a#b.jpg"] == (["the #1 hash"], "val")
        assert by_image(cs)["my photo.jpg"] == (["a photo with a space"], "val")
        assert by_image(cs)["c.jpg"] == (["C #2 tab"], "train")
        assert cs.layout == "flickr8k-token" and not cs.problems[MALFORMED]
    kaggle = tmp_path / "k30k"
    touch(kaggle, ["a|b.jpg", "c.jpg"])
    (kaggle / "results.csv").write_text("image_name| comment_number| comment\na|b.jpg| 0| A pipe | in it .\n"
                                        "c.jpg| 0| C .\n")  # fmt: skip
    cs = read_captions(kaggle)
    assert by_image(cs) == {
        "a|b.jpg": (["A pipe | in it ."], hash_split("a|b.jpg")),
        "c.jpg": (["C ."], hash_split("c.jpg")),
    }


def test_names_and_captions_are_compared_in_nfc(tmp_path):
    """An image stored as NFD `résumé.jpg` but listed in NFC was reported both missing and uncaptioned; an image
    listed once in NFC and once in NFD was two images. Names match in NFC, the store keeps the name as it is on
    disk (so that it opens), and captions are kept in NFC."""
    nfc = "résumé.jpg"
    nfd = unicodedata.normalize("NFD", nfc)
    root = tmp_path / "imgs"
    touch(root, [nfd, "café.jpg"])
    rows = [(nfc, 0, "un café"), (nfd, 1, unicodedata.normalize("NFD", "un café noir")), ("café.jpg", 0, "x")]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows), encoding="utf-8")
    (root / "Flickr_8k.testImages.txt").write_text(unicodedata.normalize("NFD", "café.jpg") + "\n" + nfc + "\n")
    cs = read_captions(root)
    assert by_image(cs) == {nfd: (["un café", "un café noir"], "test"), "café.jpg": (["x"], "test")}
    assert cs.problems[MISSING] == 0 and cs.problems[UNCAPTIONED] == 0
    assert hash_split(nfd) == hash_split(nfc)


def test_flickr8k_token_one_folder_down_with_images_in_a_sibling(tmp_path):
    """The original Flickr8k downloads: Flickr8k_text/ (captions, split files) next to Flicker8k_Dataset/."""
    touch(tmp_path / "Flicker8k_Dataset", ["a.jpg", "b.jpg"])
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    rows = [(n, k, f"{n} {k}") for n in ("a.jpg", "b.jpg") for k in range(5)]
    (text / "Flickr8k.token.txt").write_text(token_lines(rows))
    (text / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("b.jpg\n")
    cs = read_captions(tmp_path)
    assert cs.source == text / "Flickr8k.token.txt"
    assert by_image(cs) == {
        "Flicker8k_Dataset/a.jpg": ([f"a.jpg {k}" for k in range(5)], "train"),
        "Flicker8k_Dataset/b.jpg": ([f"b.jpg {k}" for k in range(5)], "test"),
    }


# --- Kaggle Flickr8k captions.txt ------------------------------------------------------------------------------


def test_kaggle_flickr8k_captions_txt_with_quoted_and_unquoted_commas(tmp_path):
    root = tmp_path / "kaggle8k"
    touch(root / "Images", ["a.jpg", "b.jpg"])
    (root / "captions.txt").write_text(
        "image,caption\n"
        'a.jpg,"A dog shakes its head near the shore , a red ball next to it ."\n'
        "a.jpg,A plain caption .\n"
        "b.jpg,An unquoted caption, with a comma .\n",
        encoding="utf-8",
    )
    cs = read_captions(root)
    assert cs.layout == "kaggle-flickr8k"
    assert by_image(cs) == {
        "Images/a.jpg": (
            ["A dog shakes its head near the shore , a red ball next to it .", "A plain caption ."],
            hash_split("a.jpg"),
        ),
        "Images/b.jpg": (["An unquoted caption, with a comma ."], hash_split("b.jpg")),
    }
    assert cs.problems["malformed caption rows"] == 0


# --- choosing the captions file --------------------------------------------------------------------------------


def test_karpathy_preferred_when_several_captions_files_exist(tmp_path):
    root = tmp_path / "many"
    touch(root, ["a.jpg", "b.jpg"])
    (root / "captions.txt").write_text("image,caption\na.jpg,from captions.txt\nb.jpg,from captions.txt\n")
    (root / "Flickr8k.token.txt").write_text(token_lines([("a.jpg", 0, "from token"), ("b.jpg", 0, "from token")]))
    (root / "results.csv").write_text("image_name| comment_number| comment\na.jpg| 0| from results\n")
    # Karpathy's file one folder down still wins over the others at the top: it carries the split.
    (root / "karpathy").mkdir()
    data = {
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "from karpathy"}]},
            {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "from karpathy"}]},
        ]
    }
    (root / "karpathy" / "dataset_flickr8k.json").write_text(json.dumps(data))
    cs = read_captions(root)
    assert cs.layout == "karpathy"
    assert by_image(cs) == {"a.jpg": (["from karpathy"], "test"), "b.jpg": (["from karpathy"], "val")}

    # Without it, the Flickr8k token file (which may have official split files) beats the Kaggle files.
    (root / "karpathy" / "dataset_flickr8k.json").unlink()
    cs = read_captions(root)
    assert cs.layout == "flickr8k-token"
    assert cs.captions == [["from token"], ["from token"]]


def test_explicit_captions_file_with_unusual_name_is_recognised_by_content(tmp_path):
    touch(tmp_path / "imgs", ["a.jpg"])
    path = tmp_path / "my_tokens.txt"
    path.write_text(token_lines([("a.jpg", 0, "A cat .")]))
    cs = read_captions(tmp_path / "imgs", path)
    assert (cs.layout, cs.images, cs.captions) == ("flickr8k-token", ["a.jpg"], [["A cat ."]])

    bad = tmp_path / "notes.txt"
    bad.write_text("just some text\n")
    with pytest.raises(UserError, match="unrecognised captions file"):
        read_captions(tmp_path / "imgs", bad)
    with pytest.raises(UserError, match="captions file not found"):
        read_captions(tmp_path / "imgs", tmp_path / "nope.txt")


def test_no_captions_file_is_a_user_error_naming_the_recognised_layouts(tmp_path):
    touch(tmp_path / "imgs" / "sub", ["a.jpg", "notes.txt"])
    with pytest.raises(UserError) as e:
        read_captions(tmp_path / "imgs")
    message = str(e.value)
    for name in ("results.csv", "dataset_coco.json", "dataset_flickr30k.json", "Flickr8k.token.txt", "captions.txt"):
        assert name in message
    assert "--captions" in message
    with pytest.raises(UserError, match="images folder not found"):
        read_captions(tmp_path / "does-not-exist")


# --- names: escaping, missing, uncaptioned, caption counts -----------------------------------------------------


def test_names_escaping_the_images_folder_are_rejected_and_counted(tmp_path):
    root = tmp_path / "a" / "imgs"
    touch(root, ["ok.jpg"])
    touch(tmp_path, ["outside.jpg"])  # they exist: rejection must not depend on the file being absent
    touch(tmp_path / "a", ["up.jpg"])
    outside = tmp_path / "outside.jpg"
    rows = [
        ("ok.jpg", 0, "fine"),
        ("../up.jpg", 0, "one level up"),
        ("../../outside.jpg", 0, "two levels up"),
        ("sub/../../up.jpg", 0, "up through a subfolder"),
        (str(outside), 0, "absolute path"),
        ("C:\\outside.jpg", 0, "windows drive"),
    ]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows))
    cs = read_captions(root)
    assert cs.images == ["ok.jpg"]
    assert cs.problems[OUTSIDE] == 5


def test_captioned_images_missing_on_disk_and_uncaptioned_images_are_counted(tmp_path):
    root = tmp_path / "imgs"
    touch(root, ["a.jpg", "b.jpg", "extra.jpg", "notes.txt"])
    rows = [(n, k, f"{n} {k}") for n in ("a.jpg", "b.jpg", "ghost.jpg", "ghost2.jpg") for k in range(5)]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows))
    cs = read_captions(root)
    assert cs.images == ["a.jpg", "b.jpg"]
    assert cs.problems[MISSING] == 2
    assert cs.problems[UNCAPTIONED] == 1  # extra.jpg; notes.txt is not an image


def test_images_with_4_or_6_captions_are_kept_and_counted(tmp_path):
    root = tmp_path / "imgs"
    touch(root, ["four.jpg", "six.jpg", "five.jpg"])
    counts = {"four.jpg": 4, "six.jpg": 6, "five.jpg": 5}
    rows = [(n, k, f"{n} caption {k}") for n, c in counts.items() for k in range(c)]
    (root / "Flickr8k.token.txt").write_text(token_lines(rows))
    cs = read_captions(root)
    assert {n: len(c) for n, (c, _) in by_image(cs).items()} == counts
    assert cs.problems["images with 4 captions (kept)"] == 1
    assert cs.problems["images with 6 captions (kept)"] == 1
    assert cs.problems["images with 5 captions (kept)"] == 0


def test_malformed_rows_are_skipped_and_counted_the_rest_kept(tmp_path):
    root = tmp_path / "imgs"
    touch(root, ["a.jpg"])
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\tA cat .\nno separator here\na.jpg#1\t   \n\na.jpg#2\tA dog .\n")
    cs = read_captions(root)
    assert cs.captions == [["A cat .", "A dog ."]]
    assert cs.problems["malformed caption rows"] == 2


def test_symlinked_images_inside_the_images_folder_are_followed(tmp_path):
    """A folder of symlinks to the real files (a common way to assemble a dataset) works."""
    real = tmp_path / "store"
    touch(real, ["a.jpg", "b.jpg", "c.jpg"])
    root = tmp_path / "imgs"
    root.mkdir()
    try:
        for n in ("a.jpg", "b.jpg", "c.jpg"):
            (root / n).symlink_to(real / n)
        (root / "more").symlink_to(real, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("this file system does not support symlinks")
    (root / "Flickr8k.token.txt").write_text(token_lines([("a.jpg", 0, "A"), ("b.jpg", 0, "B")]))
    cs = read_captions(root)
    assert cs.images == ["a.jpg", "b.jpg"]
    assert cs.problems[UNCAPTIONED] == 1  # c.jpg
    assert cs.problems[OUTSIDE] == 0


# --- the hash split ----------------------------------------------------------------------------------------------


def test_hash_split_is_stable_and_independent_of_order(tmp_path):
    # Pinned: changing these would silently move images between train and test in existing stores.
    assert [hash_split(n) for n in ("1000_img.jpg", "1001_img.jpg", "1014_img.jpg", "1016_img.jpg")] == [
        "train",
        "val",
        "test",
        "test",
    ]
    assert [hash_split(n) for n in ("a.jpg", "b.jpg", "e.jpg")] == ["test", "train", "val"]

    names = [f"{1000 + i}_img.jpg" for i in range(60)]
    splits = []
    for seed in (0, 1):
        root = tmp_path / f"order{seed}"
        touch(root, names)
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        (root / "captions.txt").write_text("image,caption\n" + "".join(f"{n},caption of {n}\n" for n in shuffled))
        cs = read_captions(root)
        splits.append(dict(zip(cs.images, cs.splits, strict=True)))
    assert splits[0] == splits[1]
    assert set(splits[0].values()) == {"train", "val", "test"}


def test_hash_split_is_roughly_80_10_10():
    counts = Counter(hash_split(f"{i}_photo.jpg") for i in range(20000))
    assert 0.78 < counts["train"] / 20000 < 0.82
    assert 0.085 < counts["val"] / 20000 < 0.115
    assert 0.085 < counts["test"] / 20000 < 0.115


# --- real caption files from ../shared/data --------------------------------------------------------------------


def _kaggle8k_names(real_data) -> list[str]:
    lines = real_data("flickr8k", "captions.txt").read_text(encoding="utf-8").splitlines()[1:]
    return sorted({line.split(",", 1)[0] for line in lines if line})


def test_real_flickr8k_token_file(tmp_path, real_data):
    token = real_data("flickr8k", "Flickr8k.token.txt")
    names = _kaggle8k_names(real_data)  # the 8091 images of the Flickr8k image release
    assert len(names) == 8091
    touch(tmp_path / "Flicker8k_Dataset", names)
    cs = read_captions(tmp_path, token)
    assert cs.layout == "flickr8k-token"
    assert len(cs) == 8091
    assert all(n.startswith("Flicker8k_Dataset/") for n in cs.images)
    assert all(len(c) == 5 for c in cs.captions)
    # The stray `2258277193_586949ec62.jpg.1` is repaired; that image is not in the release.
    assert cs.problems[REPAIRED_NAME] == 1
    assert cs.problems[MISSING] == 1
    assert cs.problems[OUTSIDE] == 0
    assert Counter(cs.splits) == {"train": 6000 + 91, "val": 1000, "test": 1000}
    assert sum(map(len, cs.captions)) == 40455

    entries = read_flickr8k_token(token, Counter())  # names as written: the stray one is repaired against the disk
    assert len(entries) == 8093
    assert entries["2258277193_586949ec62.jpg.1"].captions == ["people waiting for the subway"]
    assert len(entries["2258277193_586949ec62.jpg"].captions) == 4


def test_real_kaggle_flickr8k_captions_txt(tmp_path, real_data):
    captions = real_data("flickr8k", "captions.txt")
    touch(tmp_path / "Images", _kaggle8k_names(real_data))
    cs = read_captions(tmp_path, captions)
    assert cs.layout == "kaggle-flickr8k"
    assert len(cs) == 8091
    assert sum(map(len, cs.captions)) == 40455
    assert cs.problems["malformed caption rows"] == 0
    caps = dict(zip(cs.images, cs.captions, strict=True))
    assert "A dog shakes its head near the shore , a red ball next to it ." in caps["Images/1012212859_01547e3f17.jpg"]
    # The official split files sit next to this captions.txt, so they apply, as to the token file.
    assert Counter(cs.splits) == {"train": 6000 + 91, "val": 1000, "test": 1000}
    assert cs.problems[UNLISTED] == 91


@pytest.mark.slow
def test_real_karpathy_flickr30k_json_gz(tmp_path, real_data):
    path = real_data("flickr30k-captions", "dataset_flickr30k.json.gz")
    expected = {}  # the published Karpathy split, from the plain image lists shipped alongside
    for split, fname in (("train", "train_images.txt"), ("val", "val_images.txt"), ("test", "test_2016_images.txt")):
        for name in real_data("flickr30k-captions", "image_splits", fname).read_text().split():
            expected[f"flickr30k_images/{name}"] = split
    assert len(expected) == 31014

    # Found by name, images one level down as on Kaggle (empty stand-ins: reading captions decodes nothing).
    folder = tmp_path / "flickr30k_images"
    folder.mkdir()
    for name in expected:
        os.close(os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY))
    cs = read_captions(tmp_path, path)
    assert cs.layout == "karpathy"
    assert len(cs) == 31014
    assert Counter(cs.splits) == {"train": 29000, "val": 1014, "test": 1000}
    assert dict(zip(cs.images, cs.splits, strict=True)) == expected
    assert sum(map(len, cs.captions)) == 155070
    assert not +cs.problems  # nothing repaired, rejected or missing
    assert cs.images[0] == "flickr30k_images/1000092795.jpg"
    assert cs.captions[0][0] == "Two young guys with shaggy hair look at their hands while hanging out in the yard."


# --- a UTF-8 byte-order mark, in every file and layout ---------------------------------------------------------

BOM = "\ufeff"


def _layouts_with_bom(root: Path) -> dict[str, Path]:
    """One captions file of each layout, each starting with a byte-order mark, under its usual name and under
    a name of the user's own (recognised by content), for images a.jpg and b.jpg."""
    touch(root, ["a.jpg", "b.jpg"])
    items = [{"filename": n, "split": "test", "sentences": [{"raw": f"{n} karpathy"}]} for n in ("a.jpg", "b.jpg")]
    karpathy = {"images": items}
    texts = {
        "dataset_flickr8k.json": json.dumps(karpathy),
        "Flickr8k.token.txt": token_lines([("a.jpg", 0, "a.jpg token"), ("b.jpg", 0, "b.jpg token")]),
        "results.csv": "image_name| comment_number| comment\na.jpg| 0| a.jpg kaggle\nb.jpg| 0| b.jpg kaggle\n",
        "captions.txt": "image,caption\na.jpg,a.jpg csv\nb.jpg,b.jpg csv\n",
    }
    files = {}
    for name, text in texts.items():
        for label, fname in ((name, name), (f"custom {name}", f"mine_{name.replace('.', '_')}{Path(name).suffix}")):
            folder = root.parent / label.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / fname).write_text(BOM + text, encoding="utf-8")
            files[label] = folder / fname
    gz = root.parent / "gz" / "dataset_flickr8k.json.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(BOM + texts["dataset_flickr8k.json"])
    files["gzip"] = gz
    return files


def test_a_byte_order_mark_is_accepted_in_every_layout(tmp_path):
    files = _layouts_with_bom(tmp_path / "imgs")
    assert len(files) == 9
    for label, path in files.items():
        cs = read_captions(tmp_path / "imgs", path)
        assert cs.images == ["a.jpg", "b.jpg"], label
        assert [c[0].split()[0] for c in cs.captions] == ["a.jpg", "b.jpg"], label  # the first row is kept
        assert not cs.problems["malformed caption rows"], label


def test_a_byte_order_mark_in_split_files(tmp_path):
    root = tmp_path / "f8k"
    touch(root, ["a.jpg", "b.jpg"])
    (root / "Flickr8k.token.txt").write_text(token_lines([("a.jpg", 0, "A"), ("b.jpg", 0, "B")]))
    (root / "Flickr_8k.testImages.txt").write_text(BOM + "a.jpg\n", encoding="utf-8")
    (root / "Flickr_8k.devImages.txt").write_text(BOM + "b.jpg\r\n", encoding="utf-8")
    assert read_captions(root).splits == ["test", "val"]


# --- captions files that are not captions files ------------------------------------------------------------------


def test_captions_that_are_a_folder_binary_huge_or_not_utf8_are_one_clear_error(tmp_path):
    imgs = tmp_path / "imgs"
    touch(imgs, ["a.jpg"])
    cases = {
        "folder": (tmp_path / "afolder", None, "is a folder, not a file"),
        "binary": (tmp_path / "photo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16, "not UTF-8 text"),
        "binary token": (tmp_path / "t" / "Flickr8k.token.txt", b"\xff\xd8\xff\xe0" + bytes(range(256)), "not UTF-8"),
        "latin-1": (tmp_path / "l" / "captions.txt", "image,caption\na.jpg,café\n".encode("latin-1"), "byte 0xe9"),
        "huge line": (tmp_path / "huge.txt", b"x" * 3_000_000, "unrecognised captions file"),
        "huge row": (tmp_path / "h" / "results.csv", b"a.jpg 0 " + b"x" * 3_000_000, "no usable captions"),
        "nested": (tmp_path / "deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "bad gzip": (tmp_path / "g" / "dataset_coco.json.gz", gzip.compress(b'{"images": []}')[:-12], "cannot read"),
        "not gzip": (tmp_path / "g2" / "dataset_coco.json.gz", b"plain text", "cannot read captions file"),
        "json list": (tmp_path / "list.json", b"[1, 2]", "not a Karpathy dataset file"),
    }
    for label, (path, data, message) in cases.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        with pytest.raises(UserError) as e:
            read_captions(imgs, path)
        assert message in str(e.value), (label, str(e.value))
        assert "\n" not in str(e.value), label

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "Flickr8k.token.txt").write_text(token_lines([("a.jpg", 0, "A")]))
    (tmp_path / "s" / "Flickr_8k.testImages.txt").write_bytes(b"\xff\xfe binary")
    with pytest.raises(UserError, match="cannot read split file .*not UTF-8"):
        read_captions(imgs, tmp_path / "s" / "Flickr8k.token.txt")


# --- property tests: whatever a captions file holds, a CaptionSet or a UserError -------------------------------

PROPERTY = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same examples every run: CI never flakes; raise max_examples to explore
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ON_DISK = ["a.jpg", "b.jpg", "sub/c.jpg", "x.jpg"]
FRAGMENTS = [
    "a.jpg", "b.jpg", "sub/c.jpg", "x.jpg.1", "../a.jpg", "/etc/passwd", "C:\\a.jpg", "#", "#0", "#12", "\t", "|",
    " | ", ",", '"', "\n", "\r\n", "\r", " ", "image,caption", "image_name| comment_number| comment", "0", "4",
    "A dog runs .", "café", "\x00", "\x1b", "\ufeff", "\ud800", "\u2028", "🐕",
]  # fmt: skip
NAMES = ["Flickr8k.token.txt", "results.csv", "captions.txt", "dataset_flickr8k.json", "custom.txt", "custom.json"]


def _check(result_or_error) -> None:
    """A CaptionSet that keeps its promises, or a UserError."""
    cs = result_or_error
    if isinstance(cs, UserError):
        assert str(cs) and "\n" not in str(cs)
        return
    assert len(cs.images) == len(cs.captions) == len(cs.splits) > 0
    assert set(cs.splits) <= {"train", "val", "test"}
    assert set(cs.images) <= set(ON_DISK)
    for caps in cs.captions:
        assert caps and all(c and c == " ".join(c.split()) for c in caps)
        for c in caps:
            c.encode("utf-8")  # storable: no lone surrogates
            assert not any(ord(ch) < 32 for ch in c)


def _read(folder: Path, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    try:
        return read_captions(folder / "imgs", path)
    except UserError as e:
        return e


@pytest.fixture(scope="module")
def parser_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parsers")
    touch(folder / "imgs", ON_DISK)
    return folder


@PROPERTY
@given(data=st.binary(max_size=600), name=st.sampled_from([*NAMES, "dataset_coco.json.gz"]))
def test_any_bytes_read_as_captions(parser_folder, data, name):
    _check(_read(parser_folder, name, data))


@PROPERTY
@given(
    pieces=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=60),
    name=st.sampled_from(NAMES),
    bom=st.booleans(),
)
def test_any_text_read_as_captions(parser_folder, pieces, name, bom):
    text = ("\ufeff" if bom else "") + "".join(pieces)
    _check(_read(parser_folder, name, text.encode("utf-8", "surrogatepass")))


_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from([*FRAGMENTS, "train", "val", "test", "restval"]),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_SENTENCE = st.one_of(_JSON, st.fixed_dictionaries({}, optional={"raw": _JSON, "tokens": _JSON}))
_ITEM = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "filename": st.one_of(st.sampled_from(FRAGMENTS), _JSON),
            "filepath": st.one_of(st.sampled_from(["", "sub", "..", "/"]), _JSON),
            "split": st.one_of(st.sampled_from(["train", "val", "test", "restval", "other"]), _JSON),
            "sentences": st.one_of(st.lists(_SENTENCE, max_size=3), _JSON),
        },
    ),
)


@PROPERTY
@given(value=st.one_of(_JSON, st.fixed_dictionaries({"images": st.one_of(st.lists(_ITEM, max_size=6), _JSON)})))
def test_any_json_read_as_a_karpathy_file(parser_folder, value):
    _check(_read(parser_folder, "dataset_flickr8k.json", json.dumps(value).encode()))


@PROPERTY
@given(data=st.binary(max_size=300), which=st.sampled_from(["trainImages", "devImages", "testImages"]))
def test_any_split_file(parser_folder, data, which):
    folder = parser_folder / "with_splits"
    touch(folder / "imgs", ON_DISK)
    (folder / f"Flickr_8k.{which}.txt").write_bytes(data)
    _check(_read(folder, "Flickr8k.token.txt", token_lines([("a.jpg", 0, "A dog .")]).encode()))
