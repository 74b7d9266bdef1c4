"""Reading an upload: the multipart form, read into memory with a byte cap checked while reading; the fields of
a caption request; the photo, opened only by the JPEG, PNG and WebP decoders and refused from its header when
it is larger than the decompression-bomb threshold. What is refused is an `ApiError` (a status and one line)."""

from __future__ import annotations

import io
import warnings

import torch
from fastapi import Request
from PIL import Image, UnidentifiedImageError

from pipeline.config import BEAM_SIZE
from pipeline.errors import describe
from pipeline.transform import DECODE_ERRORS, TransformConfig, open_image, resize_uint8

FORMATS = ("JPEG", "PNG", "WEBP")  # the only decoders an upload may reach
# the first bytes of JPEG, PNG and WebP files: a plain (not file) `image` field is taken only when it holds one
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the beam_size field, beyond the image


class ApiError(Exception):
    """A request the server refuses: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 / 10 else f"{n / 1024:.0f} KB"


class _Form:
    """The multipart parser's callbacks: the headers of each part, then its bytes into `fields`, each field
    refused (`too_large`) once it holds more than `max_file_bytes`."""

    def __init__(self, max_file_bytes: int, too_large: ApiError) -> None:
        self.max_file_bytes, self.too_large = max_file_bytes, too_large
        self.fields: dict[str, bytearray] = {}
        self.files: set[str] = set()  # the fields sent as files
        self.header, self.value = b"", b""  # of the part whose headers are being read
        self.headers: dict[bytes, bytes] = {}
        self.current: bytearray | None = None  # the field being read

    def callbacks(self) -> dict:
        return {
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header.lower()] = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if len(self.fields) >= 8:
            raise ApiError(400, "too many form fields")
        if b"filename" in options:
            self.files.add(name)
        self.fields[name] = bytearray()
        self.current = self.fields[name]
        self.headers = {}

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.current += data[start:end]  # in place: the same bytearray as in `fields`
        if len(self.current) > self.max_file_bytes:
            raise self.too_large


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

    form = _Form(max_file_bytes, too_large)
    parser = MultipartParser(params[b"boundary"], form.callbacks())
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
    return {name: bytes(value) for name, value in form.fields.items()}, form.files


def caption_request(fields: dict[str, bytes], files: set[str], max_beam_size: int) -> tuple[bytes, int]:
    """The photo and the beam size a POST /api/caption form asks for, or the ApiError that refuses it."""
    if "image" not in fields:
        raise ApiError(400, "no image: send the photo in a form field named 'image'")
    if "image" not in files and not fields["image"].startswith(IMAGE_MAGIC):
        # a plain text field (`-F image=photo.jpg`, without the @ that sends the file): no image was sent
        raise ApiError(400, "no image: the field 'image' holds text, not a file (curl: -F image=@photo.jpg)")
    beam = fields.get("beam_size", b"").decode("ascii", "replace").strip() or str(BEAM_SIZE)
    if not beam.isdigit() or not 1 <= int(beam) <= max_beam_size:
        raise ApiError(400, f"beam_size must be a whole number from 1 to {max_beam_size}")
    return fields["image"], int(beam)


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
