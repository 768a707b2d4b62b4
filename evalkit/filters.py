"""Answer filters (lm-eval's ``filter_list``): each step maps a doc's responses to new ones.

A chain of steps has a name; metrics computed on its output are keyed "metric,<name>".
Without a ``filter_list`` a task has the single chain "none", which only takes the first response.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from evalkit.errors import UsageError
from evalkit.registry import Registry
from evalkit.tasks.config import FilterChain, FilterStep

Responses = list[Any]
FILTERS: Registry[Callable[..., Callable[[Responses], Any]]] = Registry("filter")


@FILTERS.register("take_first")
def take_first() -> Callable[[Responses], Any]:
    return lambda responses: responses[0]


@FILTERS.register("lowercase")
def lowercase() -> Callable[[Responses], Any]:
    return lambda responses: [r.lower() for r in responses]


@FILTERS.register("uppercase")
def uppercase() -> Callable[[Responses], Any]:
    return lambda responses: [r.upper() for r in responses]


@FILTERS.register("remove_whitespace")
def remove_whitespace() -> Callable[[Responses], Any]:
    # Leading and trailing whitespace go; inner whitespace stays.
    return lambda responses: [r.strip() for r in responses]


@FILTERS.register("regex")
def regex(
    regex_pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0, fallback: str = "[invalid]"
) -> Callable[[Responses], Any]:
    try:
        pattern = re.compile(regex_pattern)
    except re.error as exc:
        raise UsageError(f"regex filter: bad regex_pattern {regex_pattern!r}: {exc}") from None

    def extract(text: str) -> str:
        found = pattern.findall(text)
        if not found:
            return fallback
        match = found[group_select]
        if isinstance(match, tuple):
            groups = [m for m in match if m]
            match = groups[0] if groups else fallback
        return match.strip()

    return lambda responses: [extract(r) for r in responses]


def build_step(step: FilterStep) -> Callable[[Responses], Any]:
    factory = FILTERS.get(step.function)
    try:
        return factory(**step.kwargs)
    except TypeError as exc:
        raise UsageError(f"filter '{step.function}': bad arguments {step.kwargs}: {exc}") from None


DEFAULT_CHAINS = (FilterChain(name="none", steps=(FilterStep(function="take_first"),)),)


class FilterPipeline:
    """The named chains of one task, built (and checked) once."""

    def __init__(self, chains: Sequence[FilterChain]) -> None:
        self.chains = {c.name: [build_step(s) for s in c.steps] for c in (chains or DEFAULT_CHAINS)}

    def apply(self, responses: Responses) -> dict[str, Any]:
        out = {}
        for name, steps in self.chains.items():
            value: Any = list(responses)
            for step in steps:
                value = step(value)
            out[name] = value
        return out
