"""Image captioning from a cached ResNet50 feature store: extract, fit, evaluate, generate.

The library never imports typer; `cli.py` is the only place that knows about the command line.
"""

from pipeline.errors import UserError

__all__ = ["UserError"]
