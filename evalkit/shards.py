"""Per-rank result shards: JSON lines appended as batches finish, read back by streaming.

Each carrying rank appends to its own file under ``OUTPUT/shards/``; a line is one request's
result keyed by content, and carries a checksum (``"c"``) of everything else in it, key included.
Lines are flushed and fsynced at least every ``interval`` seconds or ``every`` results, so a killed
run loses at most that window. A line that does not check out (half-written by a process that died
mid-write, cut, or changed since it was written) is never used: reading skips it, says how many it
skipped, and its request runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalkit.errors import say

SHARD_DIR = "shards"
CHECKSUM = "c"


def checksum(record: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the record's content without its checksum, keys sorted."""
    body = {k: v for k, v in record.items() if k != CHECKSUM}
    text = json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
            sealed = {**record, CHECKSUM: checksum(record)}
            self.file.write(json.dumps(sealed, ensure_ascii=False, separators=(",", ":")) + "\n")
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


def read_records(path: Path, *, warn: bool = True) -> Iterator[dict[str, Any]]:
    """The records of one shard that check out, streaming (checksum removed); the others are
    counted and, with ``warn``, reported in one line."""
    skipped = 0
    with path.open("rb") as f:
        for line in f:
            record = _verified(line)
            if record is None:
                skipped += 1
            else:
                yield record
    if skipped and warn:
        say(
            f"evalkit: warning: {skipped} saved result(s) in {path} failed their checksum (cut or changed after "
            f"they were written); they are not used and are computed again"
        )


def _verified(line: bytes) -> dict[str, Any] | None:
    try:
        if not line.endswith(b"\n"):
            return None
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.pop(CHECKSUM, None) != checksum(record):
        return None
    return record


def read_all(output: Path) -> Iterator[dict[str, Any]]:
    for path in shard_files(output):
        yield from read_records(path)
