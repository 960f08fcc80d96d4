"""Small explicit registries (models, schemes, data sets, experiments).

A registry refuses duplicate names and, asked for an unknown name, raises a ``ValueError`` that
names the registry and lists the valid choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DepthlabError(ValueError):
    """Bad user input. The message says what was wrong and how to fix it (CLI exit code 2)."""


def unknown_choice(kind: str, name: str, choices: list[str]) -> DepthlabError:
    """An error for an unknown ``name`` of ``kind`` that lists the valid ``choices``."""
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return DepthlabError(f"unknown {kind} '{name}'{hint}; choose one of: {', '.join(choices)}")


class Registry(Generic[T]):
    """A name -> object map with a decorator to register entries."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise unknown_choice(self.kind, name, self.names())
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
