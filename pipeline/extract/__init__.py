"""`extract`: run the frozen ResNet50 once over every captioned image and fill the feature store (its layer4
output, or with `layer="layer3"` the layer3 output that fit can fine-tune layer4 from).

One code path, for one process and for every rank of a torchrun job (`pipeline.distributed.Dist` does nothing
in one process), in four modules:

- `config`: `ExtractConfig`, the store's `provenance`, and the encoder factory's type;
- `plan`: what can be refused up front, and what to do with the store: create, resume, rebuild or refuse it,
  and which rows are left to extract;
- `encode`: decode the images in workers, run the encoder, write the rows through a writer;
- `jpegs`: on CUDA, the plain JPEGs decoded on the GPU instead (the workers read their bytes);
- `shared`: the writer of one rank under torchrun (features written in place, statuses through rank 0);
- `run`: `extract()`, which ties them together.

What it promises, and how:

- One writer per store: the whole run holds `exclusive(store)`; a second extract is told the pid of the
  first. Readers (fit, evaluate) never take that lock; HDF5's own lock keeps them out of a file that is
  being written, and they are told so in one line.
- Nothing the user made is replaced: `--store` must be a store made by extract, or not exist.
  `--overwrite` replaces only a store made by extract.
- Nothing done is lost: rows are written in place and resumed after Ctrl-C, kill -9, a full disk or a dead
  decoding worker. When the image folder or captions changed since, the store is rebuilt around the rows
  that are still valid (`store.create(..., carry=...)`) and only the new images are extracted.
- A read error (permission, I/O, a file gone) is not a bad image: its row is marked unreadable and the
  next run retries it. Only an image that cannot be decoded is skipped for good.
"""

from pipeline.extract.config import DECODE_MODES, EncoderFactory, ExtractConfig, provenance
from pipeline.extract.encode import ImageFiles, printable
from pipeline.extract.plan import check_options
from pipeline.extract.run import extract

__all__ = [
    "DECODE_MODES",
    "EncoderFactory",
    "ExtractConfig",
    "ImageFiles",
    "check_options",
    "extract",
    "printable",
    "provenance",
]
