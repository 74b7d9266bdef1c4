"""A fit run's per-epoch record, `OUT/metrics.jsonl`: one JSON object per epoch.

The whole file is rewritten atomically after each epoch (a few kilobytes even after hundreds of epochs), so
that it always parses, whenever the run is killed. A number that is not finite (the validation loss of a
store without validation images, a diverged loss) is written as null: strict JSON has no NaN.
"""

from __future__ import annotations

import json
import math
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


def write(path: Path, records: list[dict]) -> bool:
    """Replace the file with `records` (atomically), unless it holds them already. True when written."""
    text = "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True


def _finite(record: dict) -> dict:
    """NaN and infinities as null: strict JSON has no NaN (no validation images, a diverged loss)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
