"""How lmms-eval's evaluator scores a task where lm-eval's differs.

* Reasoning blocks: after a task's filters, each filtered response loses its reasoning blocks
  (``reasoning_tags``: the task's pairs, else those of lmms-eval's ``--reasoning_tags`` default;
  ``"none"`` or ``false`` turns it off). ``auto_strip_thinking`` strips ``<think>``/``<thinking>``
  blocks before the filters instead, and only where reasoning tags are off.
* Aggregation: only metrics named in ``metric_list`` are aggregated (a ``process_results`` key
  without an entry stays in the sample rows only); an aggregation function with an ``args``
  parameter receives the run's arguments, of which task code reads ``output_path``.
* Sample counts: ``original`` is the task's eval docs, ``effective`` the docs the run took.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# lmms-eval's --reasoning_tags default (lmms_eval/__main__.py), what a task without the key gets.
DEFAULT_REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))
# What auto_strip_thinking removes (lmms_eval/filters/transformation.py, StripThinkingFilter).
THINKING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))

TagPairs = tuple[tuple[str, str], ...]


def reasoning_tags(value: Any) -> TagPairs | None:
    """The tag pairs a task's ``reasoning_tags`` value asks for (None: no stripping)."""
    if value is None:
        return DEFAULT_REASONING_TAGS
    if value is False or value == "none":
        return None
    pairs = json.loads(value) if isinstance(value, str) else value
    if not isinstance(pairs, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise ValueError(f"reasoning_tags must be a list of [start, end] tag pairs, got {value!r}")
    return tuple((str(start), str(end)) for start, end in pairs)


def strip_reasoning(text: str, pairs: TagPairs) -> str:
    """``text`` without its reasoning blocks. A closing tag without its opening tag (the chat
    template opened the block in the prompt) keeps only what follows the last closing tag."""
    for start_tag, end_tag in pairs:
        while True:
            start = text.find(start_tag)
            end = text.find(end_tag, start) if start != -1 else -1
            if start == -1 or end == -1:
                break
            text = text[:start] + text[end + len(end_tag) :]
        if end_tag in text and start_tag not in text:
            text = text.rsplit(end_tag, 1)[-1]
    return text.strip()


def strip_response(value: Any, pairs: TagPairs) -> Any:
    """A filtered response (a string or a list of them) without reasoning blocks; others as given."""
    if isinstance(value, str):
        return strip_reasoning(value, pairs)
    if isinstance(value, list):
        return [strip_reasoning(v, pairs) if isinstance(v, str) else v for v in value]
    return value


@dataclass(frozen=True)
class AggregationArgs:
    """What an aggregation function's ``args`` parameter receives: lmms-eval passes its parsed
    command line, and task code reads only ``output_path`` (where submission files go)."""

    output_path: str | None = None


def takes_args(fn: Callable) -> bool:
    try:
        return "args" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def bind_args(aggregations: Mapping[str, Callable], args: AggregationArgs) -> dict[str, Callable]:
    """The task's aggregation functions, those with an ``args`` parameter called with ``args``."""
    return {metric: functools.partial(fn, args=args) if takes_args(fn) else fn for metric, fn in aggregations.items()}


def listed_metrics(raw: Mapping[tuple[str, str], list], aggregations: Mapping[str, Any]) -> dict:
    """The raw metric values lmms-eval aggregates: those of metrics with an aggregation."""
    return {(metric, key): values for (metric, key), values in raw.items() if metric in aggregations}


def sample_counts(eval_docs: int, taken: int) -> dict[str, int]:
    """lmms-eval's n-samples: every eval doc, and the docs the run took (its --limit applied),
    whatever number of values each metric received."""
    return {"original": eval_docs, "effective": taken}
