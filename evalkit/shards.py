"""Per-rank result shards: JSON lines appended as batches finish, read back by streaming.

Each carrying rank appends to its own file under ``OUTPUT/shards/``; a line is one request's
result keyed by content. Lines are flushed and fsynced at least every ``interval`` seconds or
``every`` results, so a killed run loses at most that window. A half-written last line (the
process died mid-write) is dropped with a warning and its request runs again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalkit.errors import UsageError, say

SHARD_DIR = "shards"


class ShardWriter:
    def __init__(self, path: Path, *, interval: float, every: int = 256) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.interval = interval
        self.every = every
        self.file = path.open("a", encoding="utf-8")
        self.pending = 0
        self.written = 0
        self.last_sync = time.monotonic()

    def add(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.pending += len(records)
        self.written += len(records)
        if self.pending >= self.every or time.monotonic() - self.last_sync >= self.interval:
            self.sync()

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.pending = 0
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.sync()
            self.file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_files(output: Path) -> list[Path]:
    folder = output / SHARD_DIR
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one shard, streaming; a torn last line is skipped with a warning."""
    with path.open("rb") as f:
        previous: bytes | None = None
        for line in f:
            if previous is not None:
                yield _parse(previous, path, last=False)
            previous = line
        if previous is not None:
            record = _parse(previous, path, last=True)
            if record is not None:
                yield record


def _parse(line: bytes, path: Path, *, last: bool) -> dict[str, Any] | None:
    try:
        if not line.endswith(b"\n"):
            raise ValueError("no newline")
        return json.loads(line)
    except ValueError:
        if last:
            say(f"evalkit: warning: dropped a half-written last line in {path}; its request runs again")
            return None
        raise UsageError(
            f"shard {path} is corrupt in the middle (not just a torn last line); "
            f"remove that file to recompute its results"
        ) from None


def read_all(output: Path) -> Iterator[dict[str, Any]]:
    for path in shard_files(output):
        yield from read_records(path)
