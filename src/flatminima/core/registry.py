"""A validated name → object registry (methods, tasks, models): one implementation for all."""

from __future__ import annotations

import re
from typing import Callable, Generic, TypeVar

from .validation import check

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
        """Decorator adding an object under ``name`` (listed) and ``aliases`` (accepted).

        A name or alias that is taken already (after normalization: ``GA-SAM`` == ``gasam``) is
        refused before anything is added, rather than silently replacing the first registration;
        aliases that normalize to the same key in one call (``layersam``, ``layer-sam``) are one."""
        keys = list(dict.fromkeys(_key(n) for n in (name, *aliases)))
        for n in (name, *aliases):
            check(self.kind, _key(n) not in self._items, n, f"a {self.kind} not registered yet")

        def deco(obj: T) -> T:
            for k in keys:
                self._items[k] = obj
            self._names.append(name)
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` and its aliases (what one :meth:`register` call added); return the object."""
        obj = self.get(name)
        self._items = {k: v for k, v in self._items.items() if v is not obj}
        self._names = [n for n in self._names if _key(n) in self._items]
        return obj

    def names(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._items

    def get(self, name: str) -> T:
        check(self.kind, name in self, name, f"one of {', '.join(self.names())}")
        return self._items[_key(name)]
