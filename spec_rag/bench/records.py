"""The benchmark's JSON-lines records: where runs write them and how they are read back."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

__all__ = ["SAMPLES_FILE", "SPEED_FILE", "append_jsonl", "read_jsonl"]

SAMPLES_FILE = "samples.jsonl"
SPEED_FILE = "speed.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a line cut short by an interrupted run is ignored."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; after a run killed mid-write, start a new line so that only the cut
    line is lost (``read_jsonl`` skips it), not this record too."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with path.open("ab+") as f:
        end = f.seek(0, 2)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # append mode: always at the end
