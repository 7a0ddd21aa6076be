"""Name -> factory registries, filled where things are defined (``@REGISTRY.register("name")``, as timm does)."""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """An ordered ``name -> factory`` table of one kind of thing (interpreter, framework, attack, ...).

    ``@REGISTRY.register("name")`` on a class or function adds it; :meth:`build` makes one by name; an unknown name is
    a ``ValueError`` that lists the choices (and the closest one)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self._items and self._items[name] is not factory:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({self._items[name]} and {factory})")
            self._items[name] = factory
            return factory
        return add

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> T:
        """The factory registered as ``name``; an unknown name fails with the list of choices."""
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown {self.kind} '{name}'{hint}; choose one of: {', '.join(self._items)}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
