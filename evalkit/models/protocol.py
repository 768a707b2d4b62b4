"""What the evaluation loop needs from a model backend, and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

# Called after every batch with the (position in the input list, result) pairs it finished, so
# results can be saved as they come and a run can stop between batches.
Progress = Callable[[list[tuple[int, Any]]], None]


class Backend(Protocol):
    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy decode) per pair."""

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        """Total log-likelihood of each text, scored in windows of the model's context."""

    def generate_until(self, requests: list[tuple[str, dict[str, Any]]], progress: Progress) -> list[str]:
        """Greedy or sampled continuation of each context, cut at its first stop sequence."""

    def describe(self) -> dict[str, Any]:
        """Model facts recorded in results.json."""
