"""Batching that keeps every request's numbers independent of its batch.

A causal model's float result for a sequence depends on the width it is padded to (kernels
pick their blocking from the sequence length), not on the other rows. So each request gets a
width that depends only on its own length: its length rounded up to a fixed grid (at most
1/8 extra). Requests are grouped by width, longest first, so a request scores the same at any
batch size and on any rank, and padding stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MAX_ROWS = 512  # rows per call when only a token budget limits a batch


@dataclass(frozen=True)
class BatchLimit:
    """How much one model call may hold: at most ``rows`` requests and, when ``tokens`` is set, at
    most that many tokens, counting each row as its padded width plus ``per_row`` (the new tokens
    a generation adds). ``auto`` asks the backend to pick ``tokens`` for its device.

    Which requests share a call never changes a request's numbers (each row's width depends only
    on itself), so any limit gives the same values; it only trades memory for speed.
    """

    rows: int = 1
    tokens: int | None = None
    per_row: int = 0
    auto: bool = False

    @classmethod
    def of(cls, limit: BatchLimit | int) -> BatchLimit:
        return limit if isinstance(limit, BatchLimit) else cls(rows=limit)

    def takes(self, rows: int, width: int) -> bool:
        """Whether a call of ``rows`` rows of ``width`` tokens is within the limit."""
        if rows > self.rows:
            return False
        return self.tokens is None or rows == 1 or rows * (width + self.per_row) <= self.tokens

    def rows_at(self, width: int) -> int:
        """Requests of ``width`` tokens one call holds (1 for auto, which adapts to memory itself)."""
        if self.auto:
            return 1
        if self.tokens is None:
            return self.rows
        return max(1, min(self.rows, self.tokens // max(width + self.per_row, 1)))

    def describe(self) -> str:
        rows = f"{self.rows} requests" if self.tokens is None or self.rows < MAX_ROWS else ""
        tokens = f"{self.tokens} tokens" if self.tokens is not None else ""
        return " and ".join(part for part in (rows, tokens) if part) + " per model call"


def padded_width(length: int, cap: int) -> int:
    """``length`` rounded up to a multiple of 2**(bits-4), never above ``cap``."""
    step = 1 << max(length.bit_length() - 4, 0)
    return min(-(-length // step) * step, max(cap, length))


def width_batches(
    items: Sequence[T],
    limit: BatchLimit | int,
    length: Callable[[T], int],
    cap: int,
    tiebreak: Callable[[T], Any] = lambda _: 0,
) -> Iterator[tuple[int, list[tuple[int, T]]]]:
    """(width, [(original position, item), ...]) batches, widest first, each within ``limit``."""
    limit = BatchLimit.of(limit)
    lengths = [length(item) for item in items]
    widths = [padded_width(n, cap) for n in lengths]
    keyed = sorted(range(len(items)), key=lambda i: (-widths[i], -lengths[i], tiebreak(items[i]), i))
    batch: list[tuple[int, T]] = []
    width = None
    for i in keyed:
        w = widths[i]
        if batch and (w != width or not limit.takes(len(batch) + 1, w)):
            yield width, batch
            batch = []
        width = w
        batch.append((i, items[i]))
    if batch:
        yield width, batch


def run_batched(
    items: Sequence[T],
    limit: BatchLimit | int,
    length: Callable[[T], int],
    cap: int,
    fn: Callable[[int, list[T]], list[Any]],
    progress: Callable[[list[tuple[int, Any]]], None],
    tiebreak: Callable[[T], Any] = lambda _: 0,
) -> list[Any]:
    """Results in input order; ``progress`` gets each finished batch's (position, result) pairs."""
    out: list[Any] = [None] * len(items)
    for width, batch in width_batches(items, limit, length, cap, tiebreak):
        results = fn(width, [item for _, item in batch])
        finished = [(position, result) for (position, _), result in zip(batch, results, strict=True)]
        for position, result in finished:
            out[position] = result
        progress(finished)
    return out


def largest_fitting(fits: Callable[[int], bool], start: int, ceiling: int = 1 << 20) -> int:
    """The largest of start, 2*start, 4*start, ... (up to ``ceiling``) for which ``fits`` holds;
    ``start`` when none does (one row always runs, or the model does not fit at all)."""
    best, size = start, start
    while size <= ceiling and fits(size):
        best, size = size, size * 2
    return best


def split_when_out_of_memory(fn: Callable[[int, list[T]], list[Any]]) -> Callable[[int, list[T]], list[Any]]:
    """``fn`` that, when a batch runs out of GPU memory, runs its two halves instead (values do not
    depend on the batch, so only the speed changes); a single request that does not fit still fails."""
    import torch

    def run(width: int, batch: list[T]) -> list[Any]:
        try:
            return fn(width, batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        return run(width, batch[:half]) + run(width, batch[half:])

    return run
