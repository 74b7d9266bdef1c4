"""`serve`: a web page and a JSON API over one loaded Captioner.

The captioning is generate's: `open_image` + `resize_uint8` for the photo, `Captioner.caption` (the one beam
search) for the words. What is added here is the web side:

- Uploads are read from the request into memory, never to a file, with a byte cap checked while reading,
  and only JPEG, PNG and WebP decoders may open them. An image larger than Pillow's decompression-bomb
  threshold (`Image.MAX_IMAGE_PIXELS`, where Pillow warns; it refuses at twice that) is refused from its
  header, before any pixel is decoded.
- Decoding runs in worker threads (at most `decode_threads` at once), off the event loop.
- The model runs in one thread of its own (`ModelWorker`), so model calls never overlap. Requests that queue
  up while it is busy are captioned together, one batch per beam size: a lone request starts at once.
- Bad input gets a 4xx status and `{"error": "one line"}`; nothing else about the server is shown.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

from pipeline.captioner import Captioner
from pipeline.config import BEAM_SIZE, ServeConfig
from pipeline.console import info
from pipeline.decode import Decoded
from pipeline.errors import UserError, describe
from pipeline.runtime import resolve_device
from pipeline.transform import DECODE_ERRORS, TransformConfig, open_image, resize_uint8

WEB = Path(__file__).with_name("web")  # the page: index.html, app.js, style.css
FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders an upload may reach
# the first bytes of JPEG, PNG and WebP files: a plain (not file) `image` field is taken only when it holds one
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the beam_size field, beyond the image
log = logging.getLogger("captioner.serve")


class ApiError(Exception):
    """A request the server refuses: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the model thread ---------------------------------------------------------------------------------------


@dataclass
class _Job:
    pixels: torch.Tensor  # (3, S, S) uint8
    beam_size: int
    future: Future


class ModelWorker:
    """The one thread that calls the model. Each round takes every job queued so far (up to `max_batch`),
    groups them by beam size and captions each group in one `Captioner.caption` call."""

    def __init__(self, captioner: Captioner, max_batch: int = 8) -> None:
        self.captioner = captioner
        self.max_batch = max(1, max_batch)
        self.images = 0  # captioned so far
        self.batches = 0  # model calls so far
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="captioner-model", daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor, beam_size: int) -> Future:
        """Queue one image; the future gets its Decoded (with the n-best `beams`)."""
        job = _Job(pixels, beam_size, Future())
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _take(self) -> tuple[list[_Job], bool]:
        """Block for one job, then add whatever else is already queued. Returns (jobs, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, stop = [first], False
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return [j for j in jobs if j.future.set_running_or_notify_cancel()], stop

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._take()
            for beam in sorted({j.beam_size for j in jobs}):
                group = [j for j in jobs if j.beam_size == beam]
                try:
                    decoded = self.captioner.caption(torch.stack([j.pixels for j in group]), beam, n_best=beam)
                except Exception as e:  # handed to the requests, which answer 500 and log it
                    for j in group:
                        j.future.set_exception(e)
                    continue
                self.images += len(group)
                self.batches += 1
                for j, d in zip(group, decoded, strict=True):
                    j.future.set_result(d)


# -- reading an upload -----------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 / 10 else f"{n / 1024:.0f} KB"


async def read_form(request: Request, max_file_bytes: int) -> tuple[dict[str, bytes], set[str]]:
    """The fields of a multipart/form-data body, read into memory: {name: bytes}, and the names of the fields
    sent as files (with a file name, whose value is otherwise ignored). Refuses (413) a body or a field larger
    than the caps while reading, before the rest arrives."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    mime, params = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "send the photo as multipart/form-data, in a field named 'image'")
    too_large = ApiError(413, f"the file is too large: the limit is {_mib(max_file_bytes)}")
    max_body = max_file_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise too_large

    fields: dict[str, bytearray] = {}
    files: set[str] = set()
    part = {"header": b"", "value": b"", "headers": {}}  # the part whose headers are being read
    current: list[bytearray] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["header"].lower()] = part["value"]
        part["header"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if len(fields) >= 8:
            raise ApiError(400, "too many form fields")
        if b"filename" in options:
            files.add(name)
        fields[name] = bytearray()
        current[:] = [fields[name]]
        part["headers"] = {}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        buf = current[0]
        buf += data[start:end]
        if len(buf) > max_file_bytes:
            raise too_large

    callbacks = {
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    parser = MultipartParser(params[b"boundary"], callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python_multipart's parse errors, a client that went away mid-body
        raise ApiError(400, f"the upload could not be read ({describe(e)})") from None
    return {name: bytes(value) for name, value in fields.items()}, files


def read_image(data: bytes, transform: TransformConfig, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Upload bytes -> ((3, S, S) uint8 pixels, (width, height)), with generate's open_image + resize_uint8."""
    if not data:
        raise ApiError(400, "the file is empty")
    not_an_image = ApiError(415, "this file is not a JPEG, PNG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:  # reads the header only
                width, height = probe.size
        if width * height > max_pixels:
            raise ApiError(
                413,
                f"the image is too large to decode safely: {width} x {height} pixels, the limit is "
                f"{max_pixels / 1e6:.0f} megapixels (a decompression bomb?)",
            )
        img = open_image(io.BytesIO(data), transform, FORMATS)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, "the image is too large to decode safely (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise not_an_image from None
    except DECODE_ERRORS:
        raise ApiError(422, "the image is damaged or truncated and cannot be decoded") from None
    return resize_uint8(img, transform), img.size


# -- what the API answers --------------------------------------------------------------------------------------


def _finite(x: object) -> object:
    """JSON has no NaN or infinity: those become null."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def model_info(captioner: Captioner, name: str) -> dict:
    """What GET /api/model shows. No filesystem path: with --host 0.0.0.0 other machines see this."""
    meta = captioner.info
    metrics, best = meta.get("metrics", {}), meta.get("best", {})
    store, train = meta.get("store", {}), meta.get("train_config", {})
    model_cfg = meta.get("model_config", {})
    finetune = train.get("finetune") or None
    return {
        "name": name,
        "vocabulary_size": len(captioner.vocab),
        "epoch": meta.get("epoch"),
        "selected_by": best.get("metric"),
        "validation": {
            "loss": _finite(metrics.get("val_loss")),
            "perplexity": _finite(metrics.get("val_perplexity")),
            "cider_d": _finite(metrics.get("val_cider_d")),
        },
        "encoder": {
            "name": store.get("encoder"),
            "weights": store.get("weights"),
            "weights_sha256": (store.get("weights_sha256") or "")[:12],
            "layer": train.get("layer") or store.get("layer") or "layer4",
        },
        "fine_tuned": finetune not in (None, "", "none"),
        "finetune": finetune,
        "decoder": {k: model_cfg.get(k) for k in ("embed_dim", "hidden_dim", "attention_dim")},
        "max_words": captioner.max_steps,
        "device": captioner.device.type,
    }


def caption_result(captioner: Captioner, d: Decoded) -> dict:
    vocab = captioner.vocab
    return {
        "caption": vocab.decode(d.tokens),
        "words": captioner.words(d),
        "attention": [[round(float(a), 6) for a in row] for row in d.attention],
        "beams": [{"caption": vocab.decode(b.tokens), "score": round(b.score, 6)} for b in d.beams],
    }


# -- the app ---------------------------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    ),
}
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}


def create_app(captioner: Captioner, cfg: ServeConfig, model_name: str = "model.pt") -> FastAPI:
    """The FastAPI app: the page, GET /api/health, GET /api/model, GET /api/colormap, POST /api/caption.
    The model thread starts and stops with the app (its lifespan)."""
    import anyio

    from pipeline.figures import COLORMAP, OVERLAY_ALPHA, colormap_table

    state: dict = {}
    about = model_info(captioner, model_name)
    colormap = {"name": COLORMAP, "alpha": OVERLAY_ALPHA, "colors": colormap_table(256)}
    pages = {route: ((WEB / file).read_bytes(), media) for route, (file, media) in PAGE_FILES.items()}
    limits = {
        "max_upload_bytes": cfg.max_upload_bytes,
        "max_pixels": cfg.max_pixels,
        "max_beam_size": cfg.max_beam_size,
        "formats": ["image/jpeg", "image/png", "image/webp"],
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["worker"] = ModelWorker(captioner, cfg.max_batch)
        state["decoders"] = anyio.CapacityLimiter(max(1, cfg.decode_threads))
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.pop("worker").close)

    app = FastAPI(title="captioner", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: "not found", 405: "method not allowed"}.get(e.status_code, str(e.detail).lower())
        return JSONResponse({"error": message}, status_code=e.status_code)

    def page(route: str) -> Callable:
        body, media = pages[route]

        async def serve_file() -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

        return serve_file

    for route in PAGE_FILES:
        app.api_route(route, methods=["GET", "HEAD"], include_in_schema=False)(page(route))

    @app.get("/api/health")
    async def health() -> dict:
        worker = state.get("worker")
        return {
            "status": "ok" if worker is not None else "starting",
            "device": captioner.device.type,
            "limits": limits,
            "captioned": {"images": worker.images, "batches": worker.batches} if worker else None,
        }

    @app.get("/api/model")
    async def model() -> dict:
        return about

    @app.get("/api/colormap")
    async def colors() -> dict:
        return colormap

    @app.post("/api/caption")
    async def caption(request: Request) -> dict:
        t0 = time.perf_counter()
        fields, files = await read_form(request, cfg.max_upload_bytes)
        if "image" not in fields:
            raise ApiError(400, "no image: send the photo in a form field named 'image'")
        if "image" not in files and not fields["image"].startswith(IMAGE_MAGIC):
            # a plain text field (`-F image=photo.jpg`, without the @ that sends the file): no image was sent
            raise ApiError(400, "no image: the field 'image' holds text, not a file (curl: -F image=@photo.jpg)")
        beam = fields.get("beam_size", b"").decode("ascii", "replace").strip() or str(BEAM_SIZE)
        if not beam.isdigit() or not 1 <= int(beam) <= cfg.max_beam_size:
            raise ApiError(400, f"beam_size must be a whole number from 1 to {cfg.max_beam_size}")
        pixels, (width, height) = await anyio.to_thread.run_sync(
            read_image, fields.pop("image"), captioner.transform, cfg.max_pixels, limiter=state["decoders"]
        )
        try:
            decoded = await asyncio.wrap_future(state["worker"].submit(pixels, int(beam)))
        except Exception:
            log.exception("captioning failed")
            raise ApiError(500, "the model failed on this image (the server's log says why)") from None
        return caption_result(captioner, decoded) | {
            "beam_size": int(beam),
            "image": {"width": width, "height": height},
            "seconds": round(time.perf_counter() - t0, 4),
            "model": about,
        }

    return app


# -- the command -----------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError that says why not (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot listen on --host {host!r}: {describe(e)}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = ": pass another --port" if e.errno in (98, 48, 10048) else ""
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or describe(e)}){hint}") from None
    return sock


def serve(cfg: ServeConfig) -> None:
    """Load the models once, then serve the page and the API until Ctrl-C."""
    import uvicorn

    if cfg.max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    if not 0 <= cfg.port <= 65535:
        raise UserError("--port must be from 0 to 65535")
    if not Path(cfg.model).is_file():
        raise UserError(f"checkpoint not found: {cfg.model} (train one with fit, or run demo)")
    device = resolve_device(cfg.device)
    sock = bind(cfg.host, cfg.port)
    try:
        captioner = Captioner.load(cfg.model, device)
        app = create_app(captioner, cfg, Path(cfg.model).name)
        port = sock.getsockname()[1]
        shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        shown = f"[{shown}]" if ":" in shown else shown
        info(f"serving {cfg.model} on {device.type}: open http://{shown}:{port}/ (Ctrl-C stops)")
        if cfg.host in ("0.0.0.0", "::", ""):
            info("listening on every network interface: anyone who can reach this machine can caption with it")
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
