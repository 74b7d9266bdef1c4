"""`serve`: load the model once, listen, and run the app under uvicorn until Ctrl-C."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from pipeline.captioner import Captioner
from pipeline.config import ServeConfig
from pipeline.errors import UserError, describe
from pipeline.runtime import resolve_device
from pipeline.serve.app import create_app

log = logging.getLogger(__name__)


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
        log.info(f"serving {cfg.model} on {device.type}: open http://{shown}:{port}/ (Ctrl-C stops)")
        if cfg.host in ("0.0.0.0", "::", ""):
            log.info("listening on every network interface: anyone who can reach this machine can caption with it")
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
