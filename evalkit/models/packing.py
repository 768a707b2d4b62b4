"""Shared-prefix packing: requests that share a context, or its beginning, scored in one row.

A row is a small tree: ``shared prefix | rest of context 1 | its blocks | rest of context 2 | its
blocks | ...``. The shared prefix is the token prefix all the row's contexts have in common (a
few-shot block, a system prompt; the whole context when they are one doc's choices). Each block
holds one continuation's tokens but the last (the tokens that predict the next ones). A token sees
the shared prefix, its own context's rest and its own block, never another context or block, and
its position ids continue its own context's, so every token is computed as it would be in its own
row ``context + continuation``. A continuation's first token is predicted at its context's last
token. In a few-shot multiple-choice task the shared part is most of every prompt, so the model
runs on each doc's question and choices instead of every choice's whole prompt again.

Which requests share rows (``share_keys``) is a function of the requests themselves, and a row's
contents are laid out in token order, never arrival order. A row's numbers depend only on its own
tokens and its padded width (see ``batching``), so a request scores the same at any batch size,
world size or layout. Requests whose input is cut to the model's context (``max_length``) are
packed alone, cut from the left as lm-eval does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

Encoded = tuple[list[int], list[int]]  # (context tokens, continuation tokens)

# Rows of more than one request are at most this wide: their (rows, width, width) mask grows with
# the square of the width, and past a few thousand tokens a shared context saves little anyway.
PACKED_WIDTH = 4096
# Contexts at least this long whose first PREFIX_CHARS characters agree may share rows (a few-shot
# block, a system prompt); shorter ones share only with identical contexts.
PREFIX_CHARS = 256
# Contexts of one beginning are cut into runs of about this many (see ``share_keys``).
SHARE_RUN = 16
# A row whose contexts share at least this many tokens computes them once and then each context in
# a row of its own that attends to their cached keys and values (``Pack.split``): attention then
# costs each context its own length times the prefix's, not the whole row's length squared.
SPLIT_SHARED = 64


@dataclass(frozen=True)
class Segment:
    """One request in a pack: its position in the caller's list, its block's first row index, the
    continuation tokens it scores and the row index of its context's last token (which predicts the
    continuation's first token)."""

    request: int
    start: int
    continuation: tuple[int, ...]
    last: int


@dataclass(frozen=True)
class Pack:
    """One model row: ``tokens`` at ``positions``.

    ``nodes`` says whose each token is: 0 for the prefix all the row's contexts share, d for the
    rest of the row's d-th context and its continuations' blocks. ``blocks`` is 0 for context tokens
    and a number of its own for each continuation's block.
    """

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    nodes: tuple[int, ...]
    blocks: tuple[int, ...]
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def scoring_rows(self, segment: Segment) -> list[int]:
        """Row indices whose next-token predictions score ``segment``'s continuation, in order."""
        if not segment.continuation:
            return []
        return [segment.last, *range(segment.start, segment.start + len(segment.continuation) - 1)]

    def split(self, min_shared: int | None = None) -> tuple[tuple[int, ...], list[Pack]] | None:
        """(the shared prefix's tokens, one row per context: its rest and its continuations' blocks,
        indexed within that row), or None when the row does not split: fewer than two contexts, a
        shared prefix shorter than ``min_shared`` (SPLIT_SHARED), or a context with no tokens past it."""
        shared = self.nodes.count(0)
        if (
            shared < max(SPLIT_SHARED if min_shared is None else min_shared, 1)
            or max(self.nodes) < 2
            or any(s.last < shared for s in self.segments)
        ):
            return None
        starts = [i for i in range(shared, len(self.nodes)) if self.nodes[i] != self.nodes[i - 1]]
        rows = []
        for start, end in zip(starts, [*starts[1:], len(self.nodes)], strict=True):
            segments = tuple(
                Segment(s.request, s.start - start, s.continuation, s.last - start)
                for s in self.segments
                if start <= s.last < end
            )
            part = slice(start, end)
            rows.append(Pack(self.tokens[part], self.positions[part], self.nodes[part], self.blocks[part], segments))
        return self.tokens[:shared], rows

    def visibility(self, width: int) -> tuple[list[int], list[int]]:
        """(nodes, blocks) over ``width`` rows; a padding row gets a negative node of its own, so it
        sees only itself (no row attends to nothing)."""
        pad = width - len(self.tokens)
        return list(self.nodes) + [-1 - i for i in range(pad)], list(self.blocks) + [0] * pad


def share_keys(contexts: Sequence[str]) -> list[Hashable | None]:
    """Which requests may share rows: one key per context (None: it shares nothing).

    The same context text (trailing spaces move onto the continuation, as lm-eval tokenizes)
    always shares. Long contexts that begin alike (their first PREFIX_CHARS characters) share in
    runs: in sorted order, a run ends after each context whose hash is 0 mod SHARE_RUN, and a run's
    key is its first context. So any union of whole runs (a rank's share, what a resume has left)
    is cut into the same runs, and a request's row, so its value, is the same at any layout. The
    runner deals each run to one rank.
    """
    stripped = [c.rstrip() for c in contexts]
    runs: dict[str, list[str]] = {}
    for text in set(stripped):
        if len(text) >= PREFIX_CHARS:
            runs.setdefault(text[:PREFIX_CHARS], []).append(text)
    key_of: dict[str, Hashable] = {}
    for texts in runs.values():
        first: str | None = None
        for text in sorted(texts):
            first = first or text
            key_of[text] = ("run", first)
            if _ends_run(text):
                first = None
    return [key_of.get(text, text or None) for text in stripped]


def _ends_run(text: str) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SHARE_RUN == 0


def pack_requests(
    encoded: Sequence[Encoded], groups: Sequence[Hashable | None], max_length: int, packed_width: int = PACKED_WIDTH
) -> list[Pack]:
    """Packs covering every request once, in order of each group's first request.

    Requests with the same non-None ``groups`` value share rows of at most ``min(max_length,
    packed_width)`` tokens: their contexts' common token prefix once per row, each distinct
    context's rest once, each continuation's block (a big group spills into further rows).
    """
    by_key: dict[Hashable, list[int]] = {}
    order: list[list[int]] = []
    for i, group in enumerate(groups):
        if group is None or _needs_cut(encoded[i], max_length):
            order.append([i])
            continue
        if group not in by_key:
            by_key[group] = []
            order.append(by_key[group])
        by_key[group].append(i)
    packs = []
    for members in order:
        if len(members) == 1 and _needs_cut(encoded[members[0]], max_length):
            packs.append(_cut_alone(members[0], encoded[members[0]], max_length))
        else:
            packs.extend(_pack_tree(members, encoded, min(max_length, packed_width)))
    return packs


def _needs_cut(pair: Encoded, max_length: int) -> bool:
    context, continuation = pair
    return len(context) + len(continuation) - 1 > max_length


def _cut_alone(request: int, pair: Encoded, max_length: int) -> Pack:
    """lm-eval's row for an over-long request: ``(context + continuation)[-(max_length + 1):][:-1]``."""
    context, continuation = pair
    tokens = (context + continuation)[-(max_length + 1) :][:-1]
    prefix = len(tokens) - len(continuation) + 1
    segment = Segment(request, prefix, tuple(continuation), prefix - 1)
    nodes = [0] * prefix + [1] * (len(tokens) - prefix)
    blocks = [0] * prefix + [1] * (len(tokens) - prefix)
    return Pack(tuple(tokens), tuple(range(len(tokens))), tuple(nodes), tuple(blocks), (segment,))


class _Row:
    """A pack being filled: the shared prefix, then contexts' rests and continuation blocks."""

    def __init__(self, shared: Sequence[int]) -> None:
        self.shared = len(shared)
        self.tokens, self.positions = list(shared), list(range(len(shared)))
        self.nodes, self.blocks = [0] * len(shared), [0] * len(shared)
        self.segments: list[Segment] = []
        self.contexts = 0

    def add_context(self, rest: Sequence[int], start: int) -> int:
        """A context's tokens past the shared prefix (at positions from ``start``), as a node of its
        own; the row index of the context's last token (in the shared prefix when it is all of it)."""
        self.contexts += 1
        if not rest:
            return self.shared - 1
        self.tokens += rest
        self.positions += range(start, start + len(rest))
        self.nodes += [self.contexts] * len(rest)
        self.blocks += [0] * len(rest)
        return len(self.tokens) - 1

    def add_block(self, request: int, continuation: list[int], last: int, start: int) -> None:
        block = continuation[:-1]
        self.segments.append(Segment(request, len(self.tokens), tuple(continuation), last))
        self.tokens += block
        self.positions += range(start, start + len(block))
        self.nodes += [self.contexts] * len(block)
        self.blocks += [len(self.segments)] * len(block)

    def pack(self) -> Pack:
        return Pack(
            tuple(self.tokens), tuple(self.positions), tuple(self.nodes), tuple(self.blocks), tuple(self.segments)
        )


def _pack_tree(members: list[int], encoded: Sequence[Encoded], cap: int) -> list[Pack]:
    """Rows for one group: contexts in token order, each one's continuations in token order, so the
    rows are the same whatever order the requests came in. A row is full at ``cap`` tokens; its
    first request is admitted whatever its size (a row wider than PACKED_WIDTH holds that one
    request and is scored as a plain causal row)."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i in members:
        by_context.setdefault(tuple(encoded[i][0]), []).append(i)
    contexts = sorted(by_context)
    shared = _common_prefix(contexts)
    packs: list[Pack] = []
    row = _Row(shared)
    for context in contexts:
        rest = context[len(shared) :]
        last: int | None = None  # where this context ends in the current row, once it is there
        for request in sorted(by_context[context], key=lambda i: (encoded[i][1], i)):
            continuation = encoded[request][1]
            need = len(continuation) - 1 + (len(rest) if last is None else 0)
            if row.segments and len(row.tokens) + need > cap:
                packs.append(row.pack())
                row, last = _Row(shared), None
            if last is None:
                last = row.add_context(rest, len(shared))
            row.add_block(request, continuation, last, len(context))
    packs.append(row.pack())
    return packs


def _common_prefix(sequences: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest prefix all share (``sequences`` sorted, so the first and the last decide)."""
    first, last = sequences[0], sequences[-1]
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def block_attention(nodes: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(rows, 1, width, width) boolean mask, True where a query may attend a key: causal, and only to
    the shared prefix (node 0), its own context (same node, block 0) or its own block."""
    query_node, key_node = nodes[:, :, None], nodes[:, None, :]
    query_block, key_block = blocks[:, :, None], blocks[:, None, :]
    width = nodes.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=nodes.device).tril()
    shared = (key_node == 0) & (query_node >= 0)
    own = (query_node == key_node) & ((key_block == 0) | (key_block == query_block))
    return (causal & (shared | own))[:, None]
