"""Name -> object registries for metrics, aggregations and filters.

Registration is by decorator; registering a name twice is a programming error, and looking
up an unknown name is a user error that suggests the closest known name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from evalkit.errors import UsageError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UsageError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {known}") from None
