"""The FastAPI app: the page (`web/`), GET /api/health, GET /api/model, GET /api/colormap and POST
/api/caption, the security headers, and errors as `{"error": "one line"}`."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pipeline.captioner import Captioner
from pipeline.config import ServeConfig
from pipeline.decode import Decoded
from pipeline.serve.uploads import ApiError, caption_request, read_form, read_image
from pipeline.serve.worker import ModelWorker

WEB = Path(__file__).with_name("web")  # the page: index.html, app.js, style.css
log = logging.getLogger("captioner.serve")


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

    state: dict = {}  # the model thread and the decoders' limiter, while the app runs

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["worker"] = ModelWorker(captioner, cfg.max_batch)
        state["decoders"] = anyio.CapacityLimiter(max(1, cfg.decode_threads))
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.pop("worker").close)

    app = FastAPI(title="captioner", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    about = model_info(captioner, model_name)
    _add_errors(app)
    _add_page(app)
    _add_info_routes(app, captioner, cfg, state, about)
    _add_caption_route(app, captioner, cfg, state, about)
    return app


def _add_errors(app: FastAPI) -> None:
    """The security headers on every response; errors as {"error": one line}."""

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


def _add_page(app: FastAPI) -> None:
    """The page's files, read once."""
    pages = {route: ((WEB / file).read_bytes(), media) for route, (file, media) in PAGE_FILES.items()}

    def page(route: str) -> Callable:
        body, media = pages[route]

        async def serve_file() -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

        return serve_file

    for route in PAGE_FILES:
        app.api_route(route, methods=["GET", "HEAD"], include_in_schema=False)(page(route))


def _add_info_routes(app: FastAPI, captioner: Captioner, cfg: ServeConfig, state: dict, about: dict) -> None:
    """GET /api/health, /api/model and /api/colormap."""
    from pipeline.figures import COLORMAP, OVERLAY_ALPHA, colormap_table

    colormap = {"name": COLORMAP, "alpha": OVERLAY_ALPHA, "colors": colormap_table(256)}
    limits = {
        "max_upload_bytes": cfg.max_upload_bytes,
        "max_pixels": cfg.max_pixels,
        "max_beam_size": cfg.max_beam_size,
        "formats": ["image/jpeg", "image/png", "image/webp"],
    }

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


def _add_caption_route(app: FastAPI, captioner: Captioner, cfg: ServeConfig, state: dict, about: dict) -> None:
    """POST /api/caption: the form read and checked, the photo decoded in a worker thread (at most
    cfg.decode_threads at once), captioned by the model thread."""
    import anyio

    @app.post("/api/caption")
    async def caption(request: Request) -> dict:
        t0 = time.perf_counter()
        fields, files = await read_form(request, cfg.max_upload_bytes)
        image, beam = caption_request(fields, files, cfg.max_beam_size)
        pixels, (width, height) = await anyio.to_thread.run_sync(
            read_image, image, captioner.transform, cfg.max_pixels, limiter=state["decoders"]
        )
        try:
            decoded = await asyncio.wrap_future(state["worker"].submit(pixels, beam))
        except Exception:
            log.exception("captioning failed")
            raise ApiError(500, "the model failed on this image (the server's log says why)") from None
        return caption_result(captioner, decoded) | {
            "beam_size": beam,
            "image": {"width": width, "height": height},
            "seconds": round(time.perf_counter() - t0, 4),
            "model": about,
        }
