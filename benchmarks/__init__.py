"""Benchmarks of the captioning pipeline: `uv run python -m benchmarks.run [--quick]` (see README.md)."""

from pipeline.config import wait_passively

wait_passively()  # torch's threads as cli.py runs them, set before any section imports torch
