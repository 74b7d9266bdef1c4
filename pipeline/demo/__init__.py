"""`demo`: the whole pipeline on a generated, captioned image set, on CPU, with no downloads.

The images are drawn with Pillow: one shape (circle, square, triangle) of one colour in one place, on a
textured background, with five captions that say what and where. extract, fit, evaluate and generate
then run on it under `cache/demo/`, and the captions are printed next to their references.

The demo deletes only what it wrote: it works in a new or empty folder, or in one an earlier demo made (it
marks them, and records in the mark the images it draws), and a rerun removes the files a demo writes there
and the images the earlier demo recorded, nothing else.

Modules: `shapes` (the picture generator: drawings, their captions, where the object is), `run` (`demo`: the
folder it claims, each stage in turn, and the report: attributes named, linear probe, attention on the object).
"""

from pipeline.config import DemoConfig
from pipeline.demo.run import MARKER, attention_on_object, attribute_accuracy, claim_folder, demo, object_attention
from pipeline.demo.shapes import draw_object_sample, draw_sample, make_dataset, object_mask

__all__ = [
    "MARKER",
    "DemoConfig",
    "attention_on_object",
    "attribute_accuracy",
    "claim_folder",
    "demo",
    "draw_object_sample",
    "draw_sample",
    "make_dataset",
    "object_attention",
    "object_mask",
]
