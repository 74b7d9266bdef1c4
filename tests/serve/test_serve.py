"""serve: the JSON API with the framework's test client (a tiny model, real photos, hostile files), the command
line, and the page in a real browser (Debian's Chromium driven by Playwright; skipped when it is not installed).

The model is test_fit.py's narrow decoder, trained 3 epochs on demo images extracted with the seeded random
ResNet50 (`--weights none`): its captions are poor, but they have words and per-word attention.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.captioner import Captioner
from pipeline.demo import make_dataset
from pipeline.extract import ExtractConfig, extract
from pipeline.model import DECODER_PRESETS
from pipeline.serve import ServeConfig, create_app
from pipeline.train import TrainConfig, fit
from pipeline.transform import open_image, resize_uint8

TINY = DECODER_PRESETS["tiny"]  # the narrow decoder, selected by name
CAP_MB = 1.0  # the test app's --max-upload-mb: real photos (50-200 KB) pass, a 1 MiB file does not
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """As test_outputs.py's `trained`: demo images, a store made by extract (--weights none, so that photos
    captioned later get features on the scale the model was trained on), then fit, here with the tiny decoder."""
    root = tmp_path_factory.mktemp("serve")
    captions = make_dataset(root / "data", 10, size=64, seed=1)
    store = root / "features.h5"
    extract(
        ExtractConfig(
            images=root / "data", captions=captions, store=store, weights="none", workers=0, device="cpu", batch_size=10
        )
    )
    cfg = TrainConfig(
        store=str(store), out=str(root / "run"), epochs=3, batch_size=8, lr=1e-2, device="cpu", min_word_count=1,
        val_decode_images=0, decoder="tiny",
    )  # fmt: skip
    fit(cfg)
    return root / "run" / "model.pt"


@pytest.fixture(scope="module")
def captioner(model_path) -> Captioner:
    return Captioner.load(model_path, CPU)


@pytest.fixture(scope="module")
def client(captioner):
    from fastapi.testclient import TestClient

    app = create_app(captioner, ServeConfig(max_upload_mb=CAP_MB), "model.pt")
    with TestClient(app) as c:  # runs the lifespan: the model thread
        yield c


@pytest.fixture(scope="module")
def photos(real_data) -> list[Path]:
    """The real photos in ../shared/data/photos (the tests that use them skip when it is absent)."""
    return sorted(real_data("photos").glob("*.jpg"))


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory, make_images) -> bytes:
    """A synthetic 256x192 JPEG, for the tests that must not depend on ../shared/data."""
    return make_images(tmp_path_factory.mktemp("jpeg"), ["a.jpg"], size=(256, 192))[0].read_bytes()


def post(client, data: bytes | None, beam_size: object = 3, name: str = "photo.jpg", mime: str = "image/jpeg"):
    files = {"image": (name, data, mime)} if data is not None else None
    return client.post("/api/caption", files=files, data={"beam_size": str(beam_size)})


def expected(captioner: Captioner, data: bytes, beam_size: int) -> dict:
    """What generate's code path gives for these bytes: open_image + resize_uint8 + Captioner.caption."""
    img = open_image(io.BytesIO(data), captioner.transform)
    d = captioner.caption(resize_uint8(img, captioner.transform).unsqueeze(0), beam_size)[0]
    return {"caption": captioner.vocab.decode(d.tokens), "words": captioner.words(d), "attention": d.attention}


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk: sizes and depths Pillow itself would not write (a bomb header, 16-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# -- the API ---------------------------------------------------------------------------------------------------


def test_health_model_and_the_page_files(client, captioner):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["limits"]["max_upload_bytes"] == int(CAP_MB * 2**20)
    model = client.get("/api/model").json()
    assert model["vocabulary_size"] == len(captioner.vocab)
    assert model["epoch"] in (1, 2, 3) and model["fine_tuned"] is False
    assert model["encoder"]["weights"] == "none" and model["encoder"]["layer"] == "layer4"
    assert model["decoder"] == TINY and model["max_words"] == 19
    assert "/" not in str(model), "no filesystem path of the server is shown"

    assert client.head("/").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    for text in (page.text, client.get("/app.js").text, client.get("/style.css").text):  # works offline
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert client.get("/nothing-here").json() == {"error": "not found"}


def test_colormap_is_the_figures_one(client):
    import matplotlib

    from pipeline.figures import COLORMAP, OVERLAY_ALPHA

    served = client.get("/api/colormap").json()
    assert served["name"] == COLORMAP == "jet" and served["alpha"] == OVERLAY_ALPHA == 0.5
    # attention_figure draws uint8 heat u with vmin 0, vmax 255: colour = cmap(u / 255)
    ref = np.asarray(matplotlib.colormaps["jet"](np.arange(256) / 255))[:, :3] * 255
    np.testing.assert_allclose(np.asarray(served["colors"]), ref, atol=0.5)


def test_caption_real_photos_as_generate_does(client, captioner, photos):
    for path in photos[:3]:
        data = path.read_bytes()
        r = post(client, data, beam_size=3)
        assert r.status_code == 200, r.text
        got, want = r.json(), expected(captioner, data, 3)
        assert got["caption"] == want["caption"] and got["words"] == want["words"]
        np.testing.assert_allclose(
            np.asarray(got["attention"]).reshape(want["attention"].shape), want["attention"], atol=1e-5
        )
        assert all(len(row) == 49 and abs(sum(row) - 1) < 1e-4 for row in got["attention"])
        assert len(got["attention"]) == len(got["words"])
        beams = got["beams"]
        assert 1 <= len(beams) <= 3 and beams[0]["caption"] == got["caption"]
        assert [b["score"] for b in beams] == sorted((b["score"] for b in beams), reverse=True)
        with Image.open(path) as img:
            assert got["image"] == {"width": img.width, "height": img.height}
        assert got["model"]["vocabulary_size"] == len(captioner.vocab) and got["beam_size"] == 3
    greedy = post(client, photos[0].read_bytes(), beam_size=1).json()
    assert len(greedy["beams"]) == 1 and greedy["beams"][0]["caption"] == greedy["caption"]


def test_same_captions_as_the_generate_command(client, model_path, photos, capsys):
    from pipeline.generate import GenerateConfig, generate

    results = generate(GenerateConfig(images=photos[3:5], model=model_path, beam_size=2, device="cpu"))
    capsys.readouterr()
    for path, result in zip(photos[3:5], results, strict=True):
        assert post(client, path.read_bytes(), beam_size=2).json()["caption"] == result["caption"]


def _bad(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and words in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]


def test_hostile_files_get_a_4xx_and_one_line(client, jpeg):
    _bad(post(client, jpeg[: len(jpeg) // 2]), 422, "damaged or truncated")
    _bad(post(client, b"hello, I am a text file\n" * 20, name="notes.txt", mime="text/plain"), 415, "not a JPEG")
    _bad(post(client, png_bytes(100_000, 100_000, 8, 2, b""), name="bomb.png", mime="image/png"), 413, "bomb")
    # between Pillow's warning (89 Mpx) and its error (179 Mpx): refused from the header too
    _bad(post(client, png_bytes(12_000, 12_000, 8, 2, b""), name="big.png", mime="image/png"), 413, "12000 x 12000")
    _bad(post(client, b""), 400, "empty")
    _bad(post(client, jpeg + b"\0" * int(CAP_MB * 2**20)), 413, "too large")
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(gif, "GIF")
    _bad(post(client, gif.getvalue(), name="a.gif", mime="image/gif"), 415, "not a JPEG, PNG or WebP")


def test_bad_requests_get_a_4xx_and_one_line(client, jpeg):
    _bad(client.post("/api/caption", files={"beam_size": (None, "3")}), 400, "no image")
    # `image` sent as a plain form field (no file name), holding text: no image (it was 415, "not a JPEG")
    _bad(client.post("/api/caption", files={"image": (None, "photo.jpg"), "beam_size": (None, "3")}), 400, "no image")
    assert client.post("/api/caption", files={"image": (None, jpeg)}).status_code == 200  # a plain field, a JPEG
    _bad(client.post("/api/caption", json={"image": "x"}), 400, "multipart/form-data")
    for beam in ("0", "11", "abc", "-1"):
        _bad(post(client, jpeg, beam_size=beam), 400, "beam_size")
    # a body announced larger than the cap is refused before it is read
    big = {"content-type": "multipart/form-data; boundary=x", "content-length": str(5 * 2**20)}
    _bad(client.post("/api/caption", content=b"--x--\r\n", headers=big), 413, "too large")
    assert client.get("/api/caption").status_code == 405


def test_16_bit_png_and_other_formats_caption_like_the_8_bit_image(client, captioner):
    rgb = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)))
    eight = io.BytesIO()
    Image.fromarray(rgb).save(eight, "PNG")
    rows = b"".join(b"\0" + (rgb[y].astype(">u2") * 257).tobytes() for y in range(rgb.shape[0]))
    sixteen = png_bytes(64, 48, 16, 2, rows)
    a = post(client, eight.getvalue(), name="a.png", mime="image/png").json()
    b = post(client, sixteen, name="b.png", mime="image/png").json()
    assert a["caption"] == b["caption"] and a["attention"] == b["attention"]
    webp = io.BytesIO()
    Image.fromarray(rgb).save(webp, "WEBP", lossless=True)
    c = post(client, webp.getvalue(), name="c.webp", mime="image/webp").json()
    assert c["caption"] == a["caption"] and c["attention"] == a["attention"]


def test_concurrent_requests_give_the_sequential_results(client, photos, jpeg):
    jobs = [(p.read_bytes(), beam) for p in photos[:2] for beam in (2, 3)] + [(jpeg, 3)]
    sequential = [post(client, data, beam).json() for data, beam in jobs]
    before = client.get("/api/health").json()["captioned"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: post(client, *job).json(), jobs))
    after = client.get("/api/health").json()["captioned"]
    assert after["images"] - before["images"] == len(jobs)
    assert after["batches"] - before["batches"] <= len(jobs)  # requests that queued up share a model call
    for s, c in zip(sequential, concurrent, strict=True):
        assert c["caption"] == s["caption"] and c["words"] == s["words"]
        assert [b["caption"] for b in c["beams"]] == [b["caption"] for b in s["beams"]]
        # A batch runs the ResNet50 on several images at once: float rounding may differ in the last digits.
        np.testing.assert_allclose(c["attention"], s["attention"], atol=1e-3)
        np.testing.assert_allclose([b["score"] for b in c["beams"]], [b["score"] for b in s["beams"]], atol=1e-3)


def test_the_model_is_warm_before_the_first_request(captioner, jpeg, monkeypatch):
    """serve captions a grey picture twice before its first request, in the model thread: the first photo then
    costs what later ones cost (the first call of each kernel; the decoder's word table, made at the second
    decode with the same weights, is there for it)."""
    from fastapi.testclient import TestClient

    calls, tables = [], []
    caption = Captioner.caption

    def recording(self, pixels, beam_size=3, n_best=0):
        calls.append((threading.current_thread().name, int(pixels.float().std() == 0)))
        tables.append(self.decoder._step_cache is not None and self.decoder._step_cache.weights.table is not None)
        return caption(self, pixels, beam_size, n_best)

    monkeypatch.setattr(Captioner, "caption", recording)
    app = create_app(captioner, ServeConfig(max_upload_mb=CAP_MB), "model.pt")
    captioner.decoder._step_cache = None  # as just loaded
    with TestClient(app) as c:
        assert post(c, jpeg).status_code == 200
    assert calls == [("captioner-model", 1), ("captioner-model", 1), ("captioner-model", 0)]
    assert tables == [False, False, True]


def test_a_model_that_fails_still_serves_and_each_request_gets_one_line(captioner, jpeg, monkeypatch, caplog):
    """A model that raises (here: on every call, the warm-up's too): the server still starts and answers its
    health check; a caption request gets a 500 with one plain sentence, and the log says why."""
    from fastapi.testclient import TestClient

    def broken(self, pixels, beam_size=3, n_best=0):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(Captioner, "caption", broken)
    app = create_app(captioner, ServeConfig(max_upload_mb=CAP_MB), "model.pt")
    with caplog.at_level("ERROR"), TestClient(app) as c:
        assert c.get("/api/health").status_code == 200
        _bad(post(c, jpeg), 500, "the model failed")
    assert "out of memory (simulated)" in caplog.text


# -- the command -----------------------------------------------------------------------------------------------


def test_cli_passes_its_options_to_the_library(cli, monkeypatch, tmp_path):
    import pipeline.serve as serve_module

    seen = []
    monkeypatch.setattr(serve_module, "serve", seen.append)
    cli("serve", "--model", tmp_path / "m.pt", "--host", "0.0.0.0", "--port", "9001", "--device", "cpu",
        "--max-upload-mb", "5")  # fmt: skip
    assert seen == [ServeConfig(model=tmp_path / "m.pt", host="0.0.0.0", port=9001, device="cpu", max_upload_mb=5.0)]
    cli("serve", "--port", "70000", code=2)


def test_cli_errors_are_one_line(cli, model_path, tmp_path):
    result = cli("serve", "--model", tmp_path / "missing.pt", code=1)
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'missing.pt'} "
                                                  "(train one with fit, or run demo)"]  # fmt: skip
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("serve", "--model", model_path, "--port", port, "--device", "cpu", code=1)
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in result.stderr


# -- the page in a real browser --------------------------------------------------------------------------------


def _figure_overlay(alpha: list[float], colors: list[list[int]]) -> np.ndarray:
    """The heat map of pipeline/figures.attention_figure for one word, in RGB (before blending with the photo)."""
    from pipeline.figures import heat_map

    return np.asarray(colors)[heat_map(np.asarray(alpha, dtype=np.float64))]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (never a browser that Playwright downloads), or skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (uv sync)")
    return path


@pytest.fixture(scope="module")
def server(captioner):
    """The real server: uvicorn on a free localhost port, in a thread."""
    import uvicorn

    from pipeline.serve import bind

    sock = bind("127.0.0.1", 0)
    app = create_app(captioner, ServeConfig(max_upload_mb=CAP_MB), "model.pt")
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if uv.started:
                break
            threading.Event().wait(0.05)
        assert uv.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_page_in_a_real_browser(chromium, server, photos, jpeg, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "notes.txt").write_text("not a photo")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            expect(page.locator("#model")).to_contain_text("epoch ")

            page.set_input_files("#file", str(photos[1]))
            words = page.locator("#words .word")
            expect(words.first).to_be_visible(timeout=30_000)
            expect(page.locator("#beams li").first).to_be_visible()
            result = page.evaluate("window.captionerPage.result")
            assert words.all_inner_texts() == result["words"]
            assert page.locator("#beams li").count() == len(result["beams"])

            blank = page.evaluate("document.getElementById('overlay').toDataURL()")
            assert not page.locator("#overlay.on").count()
            words.nth(0).hover()
            expect(page.locator("#overlay.on")).to_have_count(1)
            expect(words.nth(0)).to_have_class("word active")
            first = page.evaluate("document.getElementById('overlay').toDataURL()")
            assert first != blank, "hovering a word drew nothing"
            # drawn as attention_figure draws it (figures.heat_map), in the colour map's colours
            canvas = page.evaluate(
                "[...document.getElementById('overlay').getContext('2d').getImageData(0, 0, 224, 224).data]"
            )
            canvas = np.asarray(canvas).reshape(224, 224, 4)[..., :3]
            diff = np.abs(
                canvas - _figure_overlay(result["attention"][0], page.evaluate("window.captionerPage.colors"))
            )
            assert np.percentile(diff, 99) <= 8 and diff.mean() < 1, (diff.mean(), diff.max())
            other = next(
                (i for i in range(1, len(result["words"])) if result["attention"][i] != result["attention"][0]), None
            )
            if other is not None:
                words.nth(other).hover()
                expect(words.nth(other)).to_have_class(re.compile(r"\bactive\b"))
                assert page.evaluate("document.getElementById('overlay').toDataURL()") != first
            page.mouse.move(5, 5)
            expect(page.locator("#overlay.on")).to_have_count(0)
            page.screenshot(path=str(tmp_path / "desktop.png"))

            if len(result["words"]) > 1:
                page.click("#play")
                expect(page.locator('#words .word.active[data-index="1"]')).to_have_count(1, timeout=10_000)
                page.click("#play")  # stop

            page.set_input_files("#file", str(tmp_path / "truncated.jpg"))
            expect(page.locator("#error")).to_contain_text("damaged or truncated")
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            expect(page.locator("#error")).to_contain_text("not an image")

            # a phone: no hover, a tap shows a word's attention and a second tap hides it; no sideways scrolling
            phone = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
            phone.on("pageerror", lambda e: errors.append(str(e)))
            phone.goto(server)
            phone.set_input_files("#file", str(photos[2]))
            word = phone.locator("#words .word").first
            expect(word).to_be_visible(timeout=30_000)
            word.tap()
            expect(phone.locator("#overlay.on")).to_have_count(1)
            expect(word).to_have_class("word active pinned")
            phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
            word.tap()
            expect(phone.locator("#overlay.on")).to_have_count(0)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways"
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "desktop.png").stat().st_size > 0 and (tmp_path / "phone.png").stat().st_size > 0
