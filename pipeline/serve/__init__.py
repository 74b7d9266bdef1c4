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

Modules: `app` (create_app: the page, the routes, what the API answers), `uploads` (reading a form and its
photo, and what is refused), `worker` (the model thread), `run` (`serve`: the socket and uvicorn), `web/`
(the page's files).
"""

from pipeline.config import ServeConfig
from pipeline.serve.app import create_app
from pipeline.serve.run import bind, serve

__all__ = ["ServeConfig", "bind", "create_app", "serve"]
