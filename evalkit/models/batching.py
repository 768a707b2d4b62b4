"""Length-sorted batching that hands results back in the caller's order.

Sorting longest first keeps padding small, and the first batch is the largest, so running out
of memory happens at once rather than hours in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def sorted_batches(items: Sequence[T], size: int, key: Callable[[T], Any]) -> Iterator[list[tuple[int, T]]]:
    """Batches of (original position, item), longest first."""
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    for start in range(0, len(order), size):
        yield [(i, items[i]) for i in order[start : start + size]]


def run_batched(items: Sequence[T], size: int, key: Callable[[T], Any],
                fn: Callable[[list[T]], list[Any]], progress: Callable[[int], None]) -> list[Any]:
    out: list[Any] = [None] * len(items)
    for batch in sorted_batches(items, size, key):
        results = fn([item for _, item in batch])
        for (position, _), result in zip(batch, results, strict=True):
            out[position] = result
        progress(len(batch))
    return out
