"""A validated name → object registry (methods, tasks, models): one implementation for all."""

from __future__ import annotations

import re
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


def _key(name: str) -> str:
    """Names match ignoring case, ``-``, ``_`` and spaces (``GA-SAM`` == ``gasam``)."""
    return re.sub(r"[-_\s]", "", name.lower())


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._names: list[str] = []

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator adding an object under ``name`` (listed) and ``aliases`` (accepted)."""

        def deco(obj: T) -> T:
            for n in (name, *aliases):
                self._items[_key(n)] = obj
            self._names.append(name)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._items

    def get(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"Invalid {self.kind}: {name!r} (expected one of {', '.join(self.names())})")
        return self._items[_key(name)]
