"""A fit run's per-epoch record, `OUT/metrics.jsonl`: one JSON object per epoch.

The whole file is rewritten atomically after each epoch (a few kilobytes even after hundreds of epochs), so
that it always parses, whenever the run is killed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.console import warn
from pipeline.files import write_text_atomic


def read(path: Path) -> list[dict]:
    """The records in `path` ([] when it does not exist); an unreadable line is dropped with a warning."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            warn(f"{path}: dropped an unreadable line")
    return records


def write(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
