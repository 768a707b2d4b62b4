"""Pure sharding and merging of work items across data-parallel ranks.

Every item keeps its global index. Items are dealt to ranks by estimated cost so no rank gets
all the long requests; merging checks that each global index arrived exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def shard_indices(costs: Sequence[int], dp_rank: int, dp: int) -> list[int]:
    """Global indices this dp rank evaluates.

    Items are ranked by cost (longest first, ties by index) and dealt in a snake order
    (0..dp-1, dp-1..0, ...), which keeps the per-rank cost within one item of each other.
    The result is sorted so each rank still walks its items in global order.
    """
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank {dp_rank} outside dp {dp}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    mine = []
    for position, index in enumerate(order):
        round_, offset = divmod(position, dp)
        owner = offset if round_ % 2 == 0 else dp - 1 - offset
        if owner == dp_rank:
            mine.append(index)
    return sorted(mine)


def merge_shards(
    parts: Iterable[Iterable[tuple[int, Any]]],
    total: int,
    replaceable: Callable[[Any], bool] = lambda _: False,
) -> list[Any]:
    """Results in global order from every rank's (index, result) pairs; exactly once each.

    A result for which ``replaceable`` is true (a recorded failure that a later attempt redid)
    may be superseded; any other index arriving twice is an error.
    """
    merged: list[Any] = [None] * total
    seen = [False] * total
    for part in parts:
        for index, result in part:
            if not 0 <= index < total:
                raise AssertionError(f"gathered result for index {index}, outside 0..{total - 1}")
            if seen[index] and not replaceable(merged[index]):
                raise AssertionError(f"gathered index {index} twice")
            seen[index] = True
            merged[index] = result
    missing = [i for i, ok in enumerate(seen) if not ok]
    if missing:
        raise AssertionError(f"gather lost {len(missing)} of {total} results (first: {missing[:5]})")
    return merged
