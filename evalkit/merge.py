"""Merge: rank 0 streams every rank's shard (this launch's and earlier ones') into one output per
request, by global index, with an exactly-once check against what the ranks say they wrote. What
this launch computed is its own: an earlier launch's result for a request this launch ran again
(a member of a context group it recomputed whole) is not used, and of the results earlier launches
saved for one request (the same group computed again by a later one), the latest counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalkit.plan import RunPlan
from evalkit.sharding import merge_shards
from evalkit.shards import read_records, shard_files
from evalkit.tasks.scoring import RequestError


def merge_results(output: Path, plan: RunPlan, launch: str, written: int | None) -> list[Any]:
    """Every request's result (or its recorded error) by global index; this launch's count must
    equal what the ranks wrote (``written``; None between waves of a multi-round run, whose last
    merge checks it)."""
    index_of = plan.index_of
    counted = {"now": 0}

    def pairs() -> Iterator[tuple[int, Any]]:
        earlier: dict[int, Any] = {}  # what earlier launches saved for the requests this one reuses
        for path in shard_files(output):  # oldest launch first: its ids start with its start time
            now = path.name.startswith(launch)
            for record in read_records(path, warn=False):  # planning already reported bad lines
                counted["now"] += now
                index = index_of.get(record.get("k"))
                if index is None:
                    continue
                result = record["r"] if "r" in record else RequestError(record["error"])
                if now:
                    yield index, result
                elif index in plan.done and not (isinstance(result, RequestError) and index in earlier):
                    earlier[index] = result  # the latest launch's result (a doc recomputed whole)
        yield from earlier.items()

    outputs = merge_shards([pairs()], len(plan.requests), replaceable=lambda r: isinstance(r, RequestError))
    if written is not None and counted["now"] != written:
        raise AssertionError(f"ranks reported {written} results this run but the shards hold {counted['now']}")
    return outputs
