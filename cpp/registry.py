"""Named factories registered with a decorator, as timm registers models (encoders, engines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cpp.errors import CppError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Factories of one ``kind`` (used in error messages) by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering a factory under ``name`` (a name can be registered once)."""

        def decorator(fn: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> F:
        """The factory registered under ``name``; :class:`CppError` naming the known ones otherwise."""
        try:
            return self._factories[name]
        except KeyError:
            raise CppError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None
