"""Shared-prefix packing: the choices of a multiple-choice doc scored in one row, the context once.

All continuations of one context go into a single row: ``context | block 1 | block 2 | ...``.
Each block holds one continuation's tokens but the last (the tokens that predict the next ones)
and sees the context and its own earlier tokens, never another block. Its position ids continue
the context's, so every block token is computed as it would be in its own row ``context +
continuation``; the continuation's first token is predicted at the context's last position,
which all blocks share. In a few-shot doc the context is 10-30x longer than a choice, so the
model runs on about one choice's worth of tokens instead of every choice's context again.

A row's numbers depend only on its own tokens and its padded width (see ``batching``), and a
context's continuations are always packed together in the same order, so a request scores the
same at any batch size, world size or layout. Requests whose input is cut to the model's
context (``max_length``) are packed alone, cut from the left as lm-eval does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

Encoded = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


@dataclass(frozen=True)
class Segment:
    """One request in a pack: its position in the caller's list, its block's first row index and
    the continuation tokens it scores."""

    request: int
    start: int
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Pack:
    """One model row: ``tokens`` at ``positions``; the first ``prefix`` tokens are the shared context."""

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    prefix: int
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def scoring_rows(self, segment: Segment) -> list[int]:
        """Row indices whose next-token predictions score ``segment``'s continuation, in order."""
        if not segment.continuation:
            return []
        return [self.prefix - 1, *range(segment.start, segment.start + len(segment.continuation) - 1)]

    def block_ids(self, width: int) -> list[int]:
        """Per row index: 0 for the shared context, i + 1 for block i, and a unique negative id for
        padding (a padding row sees only itself, so no row attends to nothing)."""
        ids = [0] * self.prefix
        for number, segment in enumerate(self.segments, start=1):
            ids += [number] * (len(segment.continuation) - 1 if segment.continuation else 0)
        return ids + [-1 - i for i in range(width - len(ids))]


# Rows of more than one request are at most this wide: their (rows, width, width) mask grows with
# the square of the width, and past a few thousand tokens a shared context saves little anyway.
PACKED_WIDTH = 4096


def pack_requests(
    encoded: Sequence[Encoded], groups: Sequence[Hashable | None], max_length: int, packed_width: int = PACKED_WIDTH
) -> list[Pack]:
    """Packs covering every request once, in order of each group's first request.

    Requests with the same non-None ``groups`` value and the same context tokens share a row of
    at most ``min(max_length, packed_width)`` tokens (a big group spills into further rows).
    """
    by_key: dict[Hashable, list[int]] = {}
    order: list[list[int]] = []
    for i, ((context, _), group) in enumerate(zip(encoded, groups, strict=True)):
        if group is None or _needs_cut(encoded[i], max_length):
            order.append([i])
            continue
        key = (group, tuple(context))
        if key not in by_key:
            by_key[key] = []
            order.append(by_key[key])
        by_key[key].append(i)
    packs = []
    for members in order:
        if len(members) == 1 and _needs_cut(encoded[members[0]], max_length):
            packs.append(_cut_alone(members[0], encoded[members[0]], max_length))
        else:
            # Blocks in a fixed order (by tokens), so a row is the same whatever order requests came in.
            members = sorted(members, key=lambda i: (encoded[i][1], i))
            packs.extend(_pack_group(members, encoded, min(max_length, packed_width)))
    return packs


def _needs_cut(pair: Encoded, max_length: int) -> bool:
    context, continuation = pair
    return len(context) + len(continuation) - 1 > max_length


def _cut_alone(request: int, pair: Encoded, max_length: int) -> Pack:
    """lm-eval's row for an over-long request: ``(context + continuation)[-(max_length + 1):][:-1]``."""
    context, continuation = pair
    tokens = (context + continuation)[-(max_length + 1) :][:-1]
    prefix = len(tokens) - len(continuation) + 1
    segment = Segment(request, prefix, tuple(continuation))
    return Pack(tuple(tokens), tuple(range(len(tokens))), prefix, (segment,))


def _pack_group(members: list[int], encoded: Sequence[Encoded], cap: int) -> list[Pack]:
    context = encoded[members[0]][0]
    packs: list[Pack] = []
    tokens, positions, segments = list(context), list(range(len(context))), []
    for request in members:
        continuation = encoded[request][1]
        block = continuation[:-1]
        if segments and len(tokens) + len(block) > cap:
            packs.append(Pack(tuple(tokens), tuple(positions), len(context), tuple(segments)))
            tokens, positions, segments = list(context), list(range(len(context))), []
        segments.append(Segment(request, len(tokens), tuple(continuation)))
        tokens += block
        positions += range(len(context), len(context) + len(block))
    packs.append(Pack(tuple(tokens), tuple(positions), len(context), tuple(segments)))
    return packs


def block_attention(block_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) boolean mask, True where a query may attend a key: causal, and only
    to the shared context (id 0) or its own block."""
    query, key = block_ids[:, :, None], block_ids[:, None, :]
    width = block_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=block_ids.device).tril()
    visible = (query == key) | ((key == 0) & (query >= 0))
    return (causal & visible)[:, None]


def context_group(context: str) -> str | None:
    """What makes requests share a row: the same context text (trailing spaces move onto the
    continuation, as lm-eval tokenizes). An empty context shares nothing. The runner deals each
    group to one rank, so a group is always packed whole."""
    stripped = context.rstrip()
    return stripped or None
