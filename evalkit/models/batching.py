"""Batching that keeps every request's numbers independent of its batch.

A causal model's float result for a sequence depends on the width it is padded to (kernels
pick their blocking from the sequence length), not on the other rows. So each request gets a
width that depends only on its own length: its length rounded up to a fixed grid (at most
1/8 extra). Requests are grouped by width, longest first, so a request scores the same at any
batch size and on any rank, and padding stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def padded_width(length: int, cap: int) -> int:
    """``length`` rounded up to a multiple of 2**(bits-4), never above ``cap``."""
    step = 1 << max(length.bit_length() - 4, 0)
    return min(-(-length // step) * step, max(cap, length))


def width_batches(
    items: Sequence[T], size: int, length: Callable[[T], int], cap: int, tiebreak: Callable[[T], Any] = lambda _: 0
) -> Iterator[tuple[int, list[tuple[int, T]]]]:
    """(width, [(original position, item), ...]) batches, widest first."""
    keyed = sorted(
        range(len(items)),
        key=lambda i: (-padded_width(length(items[i]), cap), -length(items[i]), tiebreak(items[i]), i),
    )
    batch: list[tuple[int, T]] = []
    width = None
    for i in keyed:
        w = padded_width(length(items[i]), cap)
        if batch and (w != width or len(batch) == size):
            yield width, batch
            batch = []
        width = w
        batch.append((i, items[i]))
    if batch:
        yield width, batch


def run_batched(
    items: Sequence[T],
    size: int,
    length: Callable[[T], int],
    cap: int,
    fn: Callable[[int, list[T]], list[Any]],
    progress: Callable[[list[tuple[int, Any]]], None],
    tiebreak: Callable[[T], Any] = lambda _: 0,
) -> list[Any]:
    """Results in input order; ``progress`` gets each finished batch's (position, result) pairs."""
    out: list[Any] = [None] * len(items)
    for width, batch in width_batches(items, size, length, cap, tiebreak):
        results = fn(width, [item for _, item in batch])
        finished = [(position, result) for (position, _), result in zip(batch, results, strict=True)]
        for position, result in finished:
            out[position] = result
        progress(finished)
    return out
