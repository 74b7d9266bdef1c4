"""extract's GPU decoding path, run on the CPU: the workers read the files' bytes, plain JPEGs are decoded in
batches by torchvision (`decode_jpeg(..., device=...)`; nvjpeg on CUDA, libjpeg-turbo here) and resized by
the transform's own resize on a tensor; everything else goes through Pillow as on the CPU path. The same code
runs on CUDA with the device's decoder: that part is measured by benchmarks/gpu_session.sh, not here."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_extract import fake_build_encoder
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.console import terminal_logging
from pipeline.extract import ExtractConfig, extract
from pipeline.jpeg import device_decodable
from pipeline.store import SKIPPED, WRITTEN, FeatureStore
from pipeline.transform import TransformConfig, normalize, open_image, resize_uint8

# Features of the two paths on the same photo: at most this relative (L2) difference. It is the tolerance of
# a float16 store against a float32 torchvision forward (test_extract.test_features_equal_a_direct_torchvision
# _forward); measured here with --weights none: 2e-4 to 4e-3 (docs/speed.md).
FEATURE_TOL = 1e-2


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def photo(i: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture: smooth colour fields plus grain (what benchmarks.common.write_jpegs writes)."""
    rng = np.random.default_rng(i)
    w, h = size
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    base = np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.standard_normal((h, w, 3)) * 18.0, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def captions_for(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    (folder / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a picture of {n}\n" for n in names))


def run_both(folder: Path, tmp: Path, capsys, resnet: bool, **kwargs) -> dict:
    """extract on the CPU path ("pillow") and on the byte path decoded on the CPU ("bytes"): each run's summary
    and output. `resnet`: the real ResNet50 (--weights none), else a TinyTrunk."""
    out = {}
    factory = {} if resnet else {"encoder_factory": fake_build_encoder}
    for name, jpeg_device in (("pillow", None), ("bytes", "cpu")):
        cfg = ExtractConfig(
            images=folder, store=tmp / f"{name}.h5", weights="none", device="cpu", dtype="float32", **kwargs
        )
        with terminal_logging():  # what the CLI prints
            summary = extract(cfg, **factory, jpeg_device=jpeg_device)
        out[name] = summary, capsys.readouterr()
    return out


# --- which files the device may decode -----------------------------------------------------------------------


def test_plain_jpegs_are_device_decodable_and_the_rest_is_not():
    img = photo(0, (64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = Image.Exif()
    upright[0x0112] = 1
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    plain = jpeg_bytes(img, quality=90)
    yes = {
        "baseline 4:2:0": plain,
        "baseline 4:4:4": jpeg_bytes(img, subsampling=0),
        "4:2:2": jpeg_bytes(img, subsampling=1),
        "progressive": jpeg_bytes(img, progressive=True),
        "grey": jpeg_bytes(img.convert("L")),
        "EXIF orientation 1": jpeg_bytes(img, exif=upright.tobytes()),
        "trailing restart markers": jpeg_bytes(img, restart_marker_blocks=1),
    }
    no = {
        "PNG": png,
        "CMYK": jpeg_bytes(img.convert("CMYK")),
        "EXIF orientation 6": jpeg_bytes(img, exif=exif.tobytes()),
        "XMP orientation 8": jpeg_bytes(img, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'),
        "truncated": plain[: len(plain) // 2],
        "no EOI": plain[:-2],
        "empty": b"",
        "text": b"not a JPEG at all\n",
        "12-bit": _with_sof(plain, precision=12),
        "arithmetic coding": _with_sof(plain, marker=0xC9),
        "4 components": _with_sof(plain, components=4),
    }
    for name, data in yes.items():
        assert device_decodable(data), name
    for name, data in no.items():
        assert not device_decodable(data), name
    # past Pillow's decompression-bomb warning: Pillow decides (its warning, or its error)
    assert device_decodable(plain, max_pixels=64 * 48) and not device_decodable(plain, max_pixels=64 * 48 - 1)


def _with_sof(data: bytes, marker: int | None = None, precision: int | None = None, components: int | None = None):
    """`data` (a baseline JPEG) with its frame header changed in place: another SOF marker, precision or
    component count (the file no longer decodes; only its header is read)."""
    raw = bytearray(data)
    at = raw.index(b"\xff\xc0")
    if marker is not None:
        raw[at + 1] = marker
    if precision is not None:
        raw[at + 4] = precision
    if components is not None:
        raw[at + 9] = components
    return bytes(raw)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_a_damaged_jpeg_never_breaks_the_sniffing(data):
    """Whatever the bytes, the sniffing answers (no exception), and what it accepts has a JPEG's ends."""
    raw = bytearray(jpeg_bytes(photo(1, (16, 12)), quality=80))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, min(len(raw), 300) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
    if device_decodable(bytes(raw)):
        assert raw[:2] == b"\xff\xd8" and raw[-2:] == b"\xff\xd9"


# --- the resize on a tensor --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "levels"), [((500, 375), 1), ((375, 500), 1), ((500, 333), 1), ((640, 480), 1), ((64, 48), 2)]
)
def test_the_tensor_resize_is_pillows_within_a_level(size, levels):
    """Within 1 of Pillow's 8-bit value when shrinking (photos), 2 when enlarging a small image."""
    img = photo(2, size)
    by_pillow = resize_uint8(img).int()
    by_tensor = resize_uint8(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)).int()
    assert by_tensor.shape == by_pillow.shape == (3, 224, 224)
    assert (by_tensor - by_pillow).abs().max() <= levels
    batch = resize_uint8(torch.from_numpy(np.stack([np.asarray(img)] * 2)).permute(0, 3, 1, 2))
    assert batch.shape == (2, 3, 224, 224) and torch.equal(batch[1].int(), by_tensor)


def test_the_tensor_resize_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError):
        resize_uint8(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        resize_uint8(torch.zeros(4, 8, 8, dtype=torch.uint8))


# --- extract: the byte path against the CPU path -------------------------------------------------------------


def test_real_sized_jpegs_give_the_cpu_paths_features(tmp_path, capsys, real_data):
    """(a) The GPU path's code, decoding on the CPU, gives the features of the Pillow path within FEATURE_TOL,
    with a real (seeded, random) ResNet50; Flickr-sized JPEGs, 4:2:0 and 4:4:4, and two real photos."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (size, sub) in enumerate([((500, 375), 2), ((333, 500), 0), ((375, 500), 2)]):  # (w, h), 4:2:0 / 4:4:4
        photo(10 + i, size).save(d / f"synthetic{i}.jpg", quality=90, subsampling=sub)
    try:
        for p in sorted(real_data("photos").glob("*.jpg"))[:1]:
            (d / p.name).write_bytes(p.read_bytes())
    except pytest.skip.Exception:
        pass  # the synthetic photos alone
    captions_for(d)
    runs = run_both(d, tmp_path, capsys, resnet=True, batch_size=8, workers=0)
    n = sum(1 for p in d.iterdir() if p.suffix == ".jpg")
    assert runs["bytes"][0]["device_decoded_now"] == n and runs["pillow"][0]["device_decoded_now"] == 0
    assert "decoding JPEGs on cpu" in runs["bytes"][1].out
    with FeatureStore(tmp_path / "pillow.h5") as a, FeatureStore(tmp_path / "bytes.h5") as b:
        assert a.images == b.images and (a.status == WRITTEN).all() and (b.status == WRITTEN).all()
        assert (a.attrs["jpeg_decoder"], b.attrs["jpeg_decoder"]) == ("pillow", "torchvision-cpu+pillow")
        fa, fb = np.asarray(a.features), np.asarray(b.features)
        errors = [rel_err(fb[i], fa[i]) for i in range(len(fa))]
    print("relative feature differences:", [f"{e:.1e}" for e in errors])
    assert max(errors) < FEATURE_TOL, errors
    assert min(rel_err(fa[i], fa[(i + 1) % len(fa)]) for i in range(len(fa))) > 10 * FEATURE_TOL  # not vacuous


def test_other_files_go_through_pillow_and_are_counted_as_today(tmp_path, capsys):
    """(b) PNG, CMYK, 16-bit, EXIF-rotated, truncated, empty and damaged files take the CPU path: the same
    statuses, counts and warnings as a CPU-path run, and for the decodable ones Pillow's very features. The
    plain JPEGs (colour and grey) are decoded by torchvision, within the tolerance."""
    d = tmp_path / "imgs"
    d.mkdir()
    img = photo(3, (64, 48))
    for i in range(3):
        photo(20 + i, (64, 48)).save(d / f"plain{i}.jpg", quality=90)
    photo(23, (64, 48)).convert("L").save(d / "plain3_grey.jpg", quality=90)
    img.save(d / "png.png")
    img.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(d / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(d / "rotated.jpg", exif=exif.tobytes())
    plain = (d / "plain0.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(plain[: len(plain) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "bad_scan.jpg").write_bytes(_bad_scan(plain))
    captions_for(d)
    runs = run_both(d, tmp_path, capsys, resnet=False, batch_size=4, workers=1)
    (pil, pil_out), (byt, byt_out) = runs["pillow"], runs["bytes"]
    counts = ("images_written", "images_skipped", "images_unreadable", "written_now", "skipped_now")
    assert {k: pil[k] for k in counts} == {k: byt[k] for k in counts}
    assert (byt["images_written"], byt["images_skipped"]) == (8, 3)
    # batches of 4 in name order: bad_scan's batch failed on the device (Pillow decided it); then plain0-3
    assert byt["device_decoded_now"] == 4
    assert _skip_warnings(pil_out.err) == _skip_warnings(byt_out.err)
    assert "JPEGs failed to decode on cpu" in byt_out.err
    with FeatureStore(tmp_path / "pillow.h5") as a, FeatureStore(tmp_path / "bytes.h5") as b:
        assert a.images == b.images
        np.testing.assert_array_equal(a.status, b.status)
        rows = {n: i for i, n in enumerate(a.images)}
        assert {n for n in rows if a.status[rows[n]] == SKIPPED} == {"truncated.jpg", "empty.jpg", "bad_scan.jpg"}
        fa, fb = np.asarray(a.features), np.asarray(b.features)
        for name in ("png.png", "cmyk.jpg", "grey16.png", "rotated.jpg"):  # Pillow on both paths
            np.testing.assert_array_equal(fa[rows[name]], fb[rows[name]], err_msg=name)
        for name in ("plain0.jpg", "plain1.jpg", "plain2.jpg", "plain3_grey.jpg"):  # torchvision, tensor resize
            assert rel_err(fb[rows[name]], fa[rows[name]]) < FEATURE_TOL, name


def _bad_scan(jpeg: bytes) -> bytes:
    """A JPEG whose header reads as plain but whose scan names a component the frame lacks: libjpeg (Pillow's
    and torchvision's) refuses it, so the byte path's batch fails and Pillow decides, as on the CPU path."""
    raw = bytearray(jpeg)
    sos = raw.index(b"\xff\xda")
    raw[sos + 5] = 0x7F  # the first scan component's id
    return bytes(raw)


def _skip_warnings(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("warning: skipped"))


# --- the choice ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_decode_gpu_without_cuda_is_one_error_line(tmp_path, flickr8k_dir, cli):
    """(c) --decode gpu where there is no CUDA: refused before any work, with one error line."""
    result = cli("extract", "--images", flickr8k_dir, "--store", tmp_path / "s.h5", "--decode", "gpu", code=1)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: --decode gpu needs a CUDA device, and extract runs on cpu: use --decode auto", lines
    assert not (tmp_path / "s.h5").exists()


def test_decode_auto_and_cpu_on_a_cpu_decode_with_pillow(tmp_path, flickr8k_dir, cli, monkeypatch):
    from helpers_extract import fake_extract

    from pipeline.extract.jpegs import decode_device

    monkeypatch.setattr("pipeline.extract.extract", fake_extract())  # a TinyTrunk for the ResNet50

    assert decode_device("auto", torch.device("cpu")) is None
    assert decode_device("cpu", torch.device("cuda")) is None  # no probe: never the device
    cli("extract", "--images", flickr8k_dir, "--store", tmp_path / "s.h5", "--device", "cpu", "--weights", "none",
        "--workers", "0")  # fmt: skip
    with FeatureStore(tmp_path / "s.h5") as s:
        assert s.attrs["jpeg_decoder"] == "pillow"


def test_the_device_batch_is_decoded_and_placed_in_order():
    """decode_resize: one call for the batch, photos of one size resized together, each back in its place."""
    from pipeline.extract.jpegs import decode_resize

    sizes = [(64, 48), (48, 64), (64, 48), (100, 30)]
    imgs = [photo(30 + i, s) for i, s in enumerate(sizes)]
    datas = [torch.frombuffer(bytearray(jpeg_bytes(im, quality=95)), dtype=torch.uint8) for im in imgs]
    out = decode_resize(datas, torch.device("cpu"), TransformConfig())
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.uint8
    for i, data in enumerate(datas):
        expected = resize_uint8(open_image(io.BytesIO(data.numpy().tobytes()))).int()
        assert (out[i].int() - expected).abs().max() <= 2, i  # enlarged: within 2 levels
    assert normalize(out).isfinite().all()


def test_the_frame_header_offsets_that_with_sof_patches():
    """The frame header of Pillow's JPEG: precision 8, its size, 3 components with 4:2:0 sampling."""
    data = jpeg_bytes(photo(4, (64, 48)))
    at = data.index(b"\xff\xc0")
    precision, h, w, n = struct.unpack(">BHHB", data[at + 4 : at + 10])
    assert (precision, h, w, n) == (8, 48, 64, 3) and data[at + 11] == 0x22
