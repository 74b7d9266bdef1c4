"""JPEG files that can be decoded on the GPU (nvjpeg, through torchvision), and that decoding.

extract decodes most photos on the device when it is CUDA: the workers only read the files' bytes, and
`decode` turns a batch of them into pixels there. `device_decodable` says, from the header bytes alone (no
decoding), which files give exactly what Pillow would give: plain baseline or progressive, 8 bits a
sample, grey or YCbCr colour, not rotated by an EXIF or XMP orientation, complete (ending in the EOI
marker), and not past Pillow's decompression-bomb size. Anything else (PNG, CMYK, RGB-coded, 12-bit,
lossless or arithmetic-coded JPEGs, a rotated photo, a cut-off file...) is decoded by Pillow as before, with
the same results and the same errors.
"""

from __future__ import annotations

import re
import struct
import warnings

import torch

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# baseline and progressive (Huffman-coded); the other SOFn (12-bit, lossless, arithmetic coding) go to Pillow
_PLAIN_SOF = {0xC0, 0xC2}
_OTHER_SOF = {0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn: markers without a segment
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's own pattern (Image.getexif)
ORIENTATION = 0x0112


def device_decodable(data: bytes, max_pixels: int | None = None) -> bool:
    """True when `data` is a JPEG file that the device decoder turns into the pixels Pillow's open_image
    would (see the module's docstring); False sends it to Pillow. Reads the markers before the first scan,
    and the last two bytes. `max_pixels`: Pillow's Image.MAX_IMAGE_PIXELS (None: no limit)."""
    if len(data) < 4 or data[:2] != SOI or data[-2:] != EOI:
        return False
    pos, sof, jfif, adobe_rgb, exif_segments = 2, None, False, False, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return False
        if marker == 0xDA:  # start of scan: the header is over
            return sof is not None and _plain_colour(sof, jfif, adobe_rgb, max_pixels)
        if marker in _PLAIN_SOF:
            if sof is not None:
                return False
            sof = segment
        elif marker in _OTHER_SOF or marker in (0xD8, 0xD9):
            return False
        elif marker == 0xE0 and segment[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0  # transform 0: the 3 components are RGB, not YCbCr
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            exif_segments += 1
            if exif_segments > 1 or _exif_orientation(segment[6:]) not in (None, 1):
                return False
        elif marker == 0xE1 and segment.startswith(_XMP):
            found = _XMP_ORIENTATION.search(segment[len(_XMP) :])
            if found and found[2] != b"1":
                return False
        pos += 2 + length
    return False


def _plain_colour(sof: bytes, jfif: bool, adobe_rgb: bool, max_pixels: int | None) -> bool:
    """8-bit grey, or 8-bit YCbCr with full-resolution chroma planes (4:4:4, 4:2:2, 4:2:0, 4:4:0), of a size
    Pillow opens without its decompression-bomb warning."""
    if len(sof) < 6:
        return False
    precision, height, width, n = struct.unpack(">BHHB", sof[:6])
    if precision != 8 or height == 0 or width == 0 or len(sof) < 6 + 3 * n:
        return False
    if max_pixels is not None and height * width > max_pixels:
        return False
    if n == 1:
        return True
    if n != 3 or adobe_rgb:
        return False
    ids = tuple(sof[6 + 3 * i] for i in range(3))
    if not jfif and ids == (ord("R"), ord("G"), ord("B")):  # libjpeg reads these as RGB
        return False
    luma, cb, cr = (sof[7 + 3 * i] for i in range(3))
    return cb == cr == 0x11 and luma >> 4 in (1, 2) and luma & 0xF in (1, 2)


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of IFD0 of an EXIF block (None when absent); -1 when the block cannot be read
    (then Pillow decides)."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            tag, kind, _, value = struct.unpack(order + "HHI4s", tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i])
            if tag == ORIENTATION:
                return struct.unpack(order + "H", value[:2])[0] if kind == 3 else -1
        return None
    except (KeyError, struct.error):
        return -1


def decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG files (1-D uint8 CPU tensors of their bytes) to (3, H, W) uint8 RGB tensors on `device`,
    in one batched call (nvjpeg on CUDA, libjpeg-turbo on the CPU). Raises RuntimeError for the whole
    batch when one image fails (torchvision returns no partial result)."""
    if device.type == "cuda":
        # nvjpeg's hardware decoder (A100, H100, H200) writes its output before work already queued on the
        # stream has run, and the caching allocator may hand it memory that queued kernels still read
        # (pytorch/vision#9606, meta-pytorch/torchcodec#1634): the stream must be idle first, a host wait.
        torch.cuda.current_stream(device).synchronize()
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of torchcodec's; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def device_problem(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on `device` (torchvision built without nvjpeg, a driver problem...), or
    None when a small JPEG decodes there."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, "JPEG")
    try:
        (pixels,) = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
    except (RuntimeError, ValueError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None if pixels.shape == (3, 16, 16) else f"a 16x16 JPEG decoded to {tuple(pixels.shape)}"
