"""Benchmarks of the captioning pipeline: `uv run python -m benchmarks.run [--quick]` (see README.md)."""
