"""The few collectives the loop uses, each a no-op at world size 1.

Errors found while preparing a run are agreed on by all ranks, so a bad input found on one
rank ends every rank with the same one-line message instead of leaving the others waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from evalkit.errors import UsageError

T = TypeVar("T")


def all_gather(world_size: int, value: Any) -> list[Any]:
    if world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


class AgreedError(UsageError):
    """Bad input that every rank knows about, so ranks may wait for each other before exiting."""


def agreed(world_size: int, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails with bad input on any rank, fail on all of them."""
    result, error = None, None
    try:
        result = step()
    except UsageError as exc:
        error = str(exc)
    errors = [(rank, e) for rank, e in enumerate(all_gather(world_size, error)) if e is not None]
    if errors:
        rank, message = errors[0]
        if message != error and error is None:
            message = f"{message} (found on rank {rank})"
        raise AgreedError(message)
    return result
