"""`cli.py extract`: the store it writes, its features, odd and broken images, resuming, refusals, errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.datasets import SPLITS, hash_split
from pipeline.store import FORMAT_VERSION, SKIPPED, WRITTEN, FeatureStore
from pipeline.transform import IMAGENET_MEAN, IMAGENET_STD, load_uint8, normalize

ROOT = Path(__file__).resolve().parents[2]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def error_line(stderr: str) -> str:
    """The one `error:` line a user error ends with (warnings may come before it); no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert all(line.startswith("warning: ") for line in lines[:-1]), stderr
    assert "Traceback" not in stderr
    return errors[0]


def reference_input(path: Path) -> torch.Tensor:
    """The contract's transform, written out independently: Pillow open, EXIF transpose, RGB,
    224x224 bilinear, [0, 1], ImageNet mean/std. (3, 224, 224) float32."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def reference_features(weights_file: Path, paths: list[Path]) -> np.ndarray:
    """A plain torchvision forward: resnet50 with the file's weights, children[:-2], channels-last output."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    trunk = torch.nn.Sequential(*list(model.children())[:-2]).eval()
    with torch.inference_mode():
        x = torch.stack([reference_input(p) for p in paths])
        return trunk(x).permute(0, 2, 3, 1).numpy()


def extract_args(images: Path, store: Path, *extra: str | Path) -> list[str | Path]:
    return ["extract", "--images", images, "--store", store, "--device", "cpu", *extra]


# --- one small store made with a weights file, shared by the layout and value tests ---------------------------

BASIC_NAMES = ["1000_a.jpg", "1002_c.jpg", "été_d.jpg"]  # one non-ASCII name


@pytest.fixture(scope="module")
def basic(tmp_path_factory, make_images, resnet50_weights_file, cli):
    """3 tiny JPEGs, Flickr8k token captions (2 images with 5 captions, 1 with 4), extracted with --weights FILE
    to a float16 store and to a float32 one."""
    root = tmp_path_factory.mktemp("basic")
    images = root / "imgs"
    make_images(images, BASIC_NAMES)
    rows = [f"{n}#{k}\tcaption {k} of {n} , with a comma .\n" for n in BASIC_NAMES for k in range(5)]
    rows = [r for r in rows if not r.startswith("1002_c.jpg#4")]
    (images / "Flickr8k.token.txt").write_text("".join(rows), encoding="utf-8")
    args = ("--weights", resnet50_weights_file, "--batch-size", "3", "--workers", "0")
    r16 = cli(*extract_args(images, root / "f16.h5", *args))
    r32 = cli(*extract_args(images, root / "f32.h5", *args, "--dtype", "float32"))
    return {"images": images, "f16": root / "f16.h5", "f32": root / "f32.h5", "out16": r16, "out32": r32}


def test_store_layout(basic):
    names = sorted(BASIC_NAMES)
    with h5py.File(basic["f16"], "r") as f:
        feats = f["features"]
        assert feats.shape == (3, 7, 7, 2048)
        assert feats.dtype == np.float16
        assert feats.chunks is None and feats.compression is None  # contiguous: memory-mappable
        assert [s.decode("utf-8") for s in f["images"][:]] == names
        assert h5py.check_string_dtype(f["images"].dtype).encoding == "utf-8"
        assert (f["status"][:] == WRITTEN).all()
        split_names = json.loads(f["split"].attrs["names"])
        assert [split_names[i] for i in f["split"][:]] == [hash_split(n) for n in names]
        texts = [s.decode("utf-8") for s in f["captions/text"][:]]
        owners = f["captions/image"][:]
        per_image = {n: [t for t, o in zip(texts, owners, strict=True) if o == i] for i, n in enumerate(names)}
        assert per_image["1000_a.jpg"] == [f"caption {k} of 1000_a.jpg , with a comma ." for k in range(5)]
        assert len(per_image["1002_c.jpg"]) == 4
        assert per_image["été_d.jpg"][0] == "caption 0 of été_d.jpg , with a comma ."
        attrs = dict(f.attrs)
    with h5py.File(basic["f32"], "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].chunks is None
        assert f.attrs["dtype"] == "float32"

    assert attrs["format_version"] == FORMAT_VERSION
    assert "resnet50" in attrs["encoder"]
    assert attrs["weights"] == "file"
    assert attrs["weights_sha256"] == sha256(Path(attrs["weights_path"]))
    transform = json.loads(attrs["transform"])
    assert transform["size"] == 224 and transform["interpolation"] == "bilinear" and transform["exif_transpose"]
    assert tuple(transform["mean"]) == IMAGENET_MEAN and tuple(transform["std"]) == IMAGENET_STD
    assert attrs["dtype"] == "float16"
    assert attrs["captions_layout"] == "flickr8k-token"
    assert Path(attrs["captions_source"]).name == "Flickr8k.token.txt"
    for key in ("torch_version", "torchvision_version", "h5py_version", "created"):
        assert attrs[key]
    assert bool(attrs["complete"]) is True
    assert (int(attrs["images_written"]), int(attrs["images_skipped"])) == (3, 0)
    assert "3 images written, 0 skipped" in basic["out16"].stdout


def test_features_equal_a_direct_torchvision_forward(basic, resnet50_weights_file):
    # The pipeline's transform is the contract's transform ...
    path = basic["images"] / "été_d.jpg"
    assert torch.allclose(normalize(load_uint8(path)[None])[0], reference_input(path), atol=1e-5)
    # ... and each row i holds image i's trunk output.
    store = FeatureStore(basic["f16"])
    expected = reference_features(resnet50_weights_file, [basic["images"] / n for n in store.images])
    f16 = np.asarray(store.features)
    with h5py.File(basic["f32"], "r") as f:
        f32 = f["features"][:]
    for i in range(len(expected)):
        assert rel_err(f16[i], expected[i]) < 1e-2, i
        assert rel_err(f32[i], expected[i]) < 2e-5, i  # float16 storage would be ~2e-4
        # rows are distinguishable, so a shuffled or misaligned store could not pass the check above
        assert rel_err(expected[(i + 1) % len(expected)], expected[i]) > 0.05
    assert np.isfinite(f16).all() and f16.astype(np.float32).std() > 0


def test_memory_map_equals_h5py_read(basic):
    store = FeatureStore(basic["f16"])
    mm = store.features
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    assert mm.shape == (3, 7, 7, 2048) and mm.dtype == np.float16
    with h5py.File(basic["f16"], "r") as f:
        expected = f["features"][:]
    np.testing.assert_array_equal(np.asarray(mm), expected)
    assert np.abs(expected.astype(np.float32)).sum() > 0
    store.close()


# --- odd and broken images -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory, make_images, cli):
    """Images in unusual modes plus three undecodable files, extracted with one worker process."""
    root = tmp_path_factory.mktemp("odd")
    d = root / "imgs"
    d.mkdir()
    with Image.open(make_images(root, ["src.png"], size=(64, 48))[0]) as im:
        base = im.convert("RGB")

    # EXIF orientation 6: the pixels as stored must be turned 90 degrees clockwise for display.
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(d / "exif6.jpg", quality=95, exif=exif.tobytes())
    with Image.open(d / "exif6.jpg") as im:
        stored = np.asarray(im.convert("RGB"))  # decoded, not transposed
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(d / "exif6_turned.png")
    Image.fromarray(stored).save(d / "exif6_as_stored.png")

    base.convert("L").save(d / "gray.jpg", quality=95)
    with Image.open(d / "gray.jpg") as im:
        gray = np.asarray(im)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(d / "gray_as_rgb.png")

    base.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    with Image.open(d / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        im.convert("RGB").save(d / "cmyk_as_rgb.png")

    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(d / "rgba.png")
    base.save(d / "rgba_as_rgb.png")

    good = make_images(root, ["full.jpg"], size=(64, 48))[0].read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.jpg").write_text("this is not a JPEG, just text\n")

    names = sorted(p.name for p in d.iterdir())
    (d / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a picture called {n}\n" for n in names))
    result = cli(*extract_args(d, root / "odd.h5", "--weights", "none", "--batch-size", "4", "--workers", "1"))
    store = FeatureStore(root / "odd.h5")
    rows = {name: i for i, name in enumerate(store.images)}
    assert sorted(rows) == names
    return {"store": store, "rows": rows, "feats": np.asarray(store.features, dtype=np.float32), "result": result}


def test_exif_rotated_jpeg_matches_the_manually_rotated_image(odd):
    f, r = odd["feats"], odd["rows"]
    assert rel_err(f[r["exif6.jpg"]], f[r["exif6_turned.png"]]) < 1e-3
    # not a vacuous match: ignoring the tag would give clearly different features
    assert rel_err(f[r["exif6_as_stored.png"]], f[r["exif6_turned.png"]]) > 0.01


@pytest.mark.parametrize(
    ("name", "as_rgb"),
    [("gray.jpg", "gray_as_rgb.png"), ("cmyk.jpg", "cmyk_as_rgb.png"), ("rgba.png", "rgba_as_rgb.png")],
)
def test_grayscale_cmyk_and_rgba_images_are_extracted_as_rgb(odd, name, as_rgb):
    f, r, status = odd["feats"], odd["rows"], odd["store"].status
    assert status[r[name]] == WRITTEN
    assert np.isfinite(f[r[name]]).all()
    assert rel_err(f[r[name]], f[r[as_rgb]]) < 1e-3
    assert rel_err(f[r[name]], f[r["exif6_turned.png"]]) > 0.01  # a different picture is told apart


def test_undecodable_images_are_skipped_with_a_warning_and_the_run_completes(odd):
    store, rows, result = odd["store"], odd["rows"], odd["result"]
    bad = ["empty.jpg", "notimage.jpg", "truncated.jpg"]
    status = store.status
    for name in bad:
        assert status[rows[name]] == SKIPPED, name
        assert any(line.startswith("warning: skipped") and name in line for line in result.stderr.splitlines()), name
    assert (np.delete(status, [rows[n] for n in bad]) == WRITTEN).all()
    assert store.complete
    n = len(rows)
    assert (int(store.attrs["images_written"]), int(store.attrs["images_skipped"])) == (n - 3, 3)
    assert f"{n - 3} images written, 3 skipped" in result.stdout
    # skipped rows never reach training or evaluation
    usable = np.concatenate([store.split_rows(s) for s in SPLITS])
    assert sorted(usable) == sorted(i for name, i in rows.items() if name not in bad)


def test_all_images_undecodable_is_an_error(tmp_path, cli):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "b.jpg").write_text("nope")
    (d / "captions.txt").write_text("image,caption\na.jpg,x\nb.jpg,y\n")
    result = cli(*extract_args(d, tmp_path / "s.h5", "--weights", "none", "--workers", "0"), code=1)
    assert "could be decoded" in error_line(result.stderr)


def test_real_photos_with_the_real_flickr8k_token_file(tmp_path, real_data, cli):
    token = real_data("flickr8k", "Flickr8k.token.txt")
    photos = sorted(real_data("photos").glob("*.jpg"))[:2]
    d = tmp_path / "imgs"
    d.mkdir()
    for p in photos:  # a temporary copy, outside the repository
        (d / p.name).write_bytes(p.read_bytes())
    result = cli(*extract_args(d, tmp_path / "s.h5", "--captions", token, "--weights", "none", "--workers", "0"))
    assert "warning: 8090 captioned images missing on disk" in result.stderr
    store = FeatureStore(tmp_path / "s.h5")
    assert store.images == [p.name for p in photos]
    assert (store.status == WRITTEN).all() and store.complete
    assert len(store.caption_text) == 10
    feats = np.asarray(store.features, dtype=np.float32)
    assert np.isfinite(feats).all() and rel_err(feats[0], feats[1]) > 0.05


# --- resuming --------------------------------------------------------------------------------------------------


# kill -9 and resuming: tests/test_extract_safety.py (a forked zygote, deterministic timing)


# --- a store made differently ----------------------------------------------------------------------------------


def test_mismatched_store_is_refused_unless_overwrite(tmp_path, flickr8k_dir, resnet50_weights_file, cli):
    store = tmp_path / "s.h5"
    cli(*extract_args(flickr8k_dir, store, "--weights", "none", "--workers", "0"))
    before = sha256(store)

    refused = cli(*extract_args(flickr8k_dir, store, "--weights", "none", "--dtype", "float32"), code=1)
    line = error_line(refused.stderr)
    assert "dtype" in line and "--overwrite" in line

    refused = cli(*extract_args(flickr8k_dir, store, "--weights", resnet50_weights_file), code=1)
    assert "weights" in error_line(refused.stderr)

    assert sha256(store) == before  # refusals leave the store alone

    # A changed image list is not a refusal: the store is rebuilt around its rows (test_extract_safety.py).
    (flickr8k_dir / "2000_new.jpg").write_bytes((flickr8k_dir / "1000_img.jpg").read_bytes())
    with open(flickr8k_dir / "Flickr8k.token.txt", "a") as f:
        f.write("2000_new.jpg#0\ta new picture .\n")

    cli(*extract_args(flickr8k_dir, store, "--weights", "none", "--dtype", "float32", "--workers", "0", "--overwrite"))
    replaced = FeatureStore(store)
    assert replaced.features.dtype == np.float32
    assert replaced.complete and len(replaced) == 4 and "2000_new.jpg" in replaced.images


def test_a_file_that_is_not_a_store_is_refused(tmp_path, flickr8k_dir, cli):
    store = tmp_path / "notes.h5"
    store.write_text("my notes, not a feature store\n")
    result = cli(*extract_args(flickr8k_dir, store, "--weights", "none"), code=1)
    assert "not a feature store made by extract" in error_line(result.stderr)
    assert store.read_text() == "my notes, not a feature store\n"


# --- command-line errors ---------------------------------------------------------------------------------------


def test_missing_images_folder_is_one_error_line_in_a_real_process(tmp_path, cli_subprocess):
    proc = cli_subprocess(*extract_args(tmp_path / "nope", tmp_path / "s.h5", "--weights", "none"))
    assert proc.returncode == 1, proc.stderr
    assert "images folder not found" in error_line(proc.stderr)
    assert str(tmp_path / "nope") in proc.stderr
    assert not (tmp_path / "s.h5").exists()


def test_no_captions_file_is_an_error(tmp_path, make_images, cli):
    make_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    result = cli(*extract_args(tmp_path / "imgs", tmp_path / "s.h5", "--weights", "none"), code=1)
    line = error_line(result.stderr)
    assert "no captions file" in line and "Flickr8k.token.txt" in line and "results.csv" in line
    assert not (tmp_path / "s.h5").exists()


def test_imagenet_weights_offline_is_an_error_pointing_to_weights_none(tmp_path, flickr8k_dir, monkeypatch, cli):
    # An empty torch hub folder (nothing cached) and no network, whatever this machine has.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    result = cli(*extract_args(flickr8k_dir, tmp_path / "s.h5", "--weights", "IMAGENET1K_V1"), code=1)
    line = error_line(result.stderr)
    assert "IMAGENET1K_V1" in line and "--weights none" in line
    assert not (tmp_path / "s.h5").exists()


def test_bad_weights_files_are_errors(tmp_path, flickr8k_dir, cli):
    store = tmp_path / "s.h5"
    result = cli(*extract_args(flickr8k_dir, store, "--weights", tmp_path / "missing.pth"), code=1)
    assert "missing.pth" in error_line(result.stderr)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    result = cli(*extract_args(flickr8k_dir, store, "--weights", garbage), code=1)
    assert "cannot load weights file" in error_line(result.stderr)

    wrong = tmp_path / "resnet18ish.pth"  # right keys, wrong shapes (as in a ResNet18 or other model's file)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    result = cli(*extract_args(flickr8k_dir, store, "--weights", wrong), code=1)
    assert "not a ResNet50 state_dict" in error_line(result.stderr)

    partial = tmp_path / "partial.pth"  # a ResNet50 file missing most of its tensors
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    result = cli(*extract_args(flickr8k_dir, store, "--weights", partial), code=1)
    assert "not a ResNet50 state_dict" in error_line(result.stderr)
    assert not store.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_cuda_without_a_gpu_is_an_error(tmp_path, flickr8k_dir, cli):
    result = cli("extract", "--images", flickr8k_dir, "--store", tmp_path / "s.h5", "--device", "cuda", code=1)
    assert "cuda" in error_line(result.stderr).lower()


@pytest.mark.parametrize(
    "extra",
    [["--no-such-option"], ["--batch-size", "0"], ["--workers", "-1"], ["--batch-size", "many"]],
)
def test_usage_errors_exit_2(tmp_path, flickr8k_dir, cli, extra):
    result = cli("extract", "--images", flickr8k_dir, "--store", tmp_path / "s.h5", *extra, code=2)
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists()


def test_missing_required_images_option_exits_2(cli):
    result = cli("extract", code=2)
    assert "--images" in result.output
