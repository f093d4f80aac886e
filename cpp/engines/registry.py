"""A registry of embedding engines by name (``cpp embed --engine NAME``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cpp.engines.base import EmbedEngine
from cpp.errors import CppError

EngineFactory = Callable[..., EmbedEngine]
F = TypeVar("F", bound=EngineFactory)

_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[F], F]:
    """Register ``fn(**options) -> EmbedEngine`` under ``name``; options it does not know are an error."""

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"engine {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_engines() -> list[str]:
    """Names of all registered engines."""
    return sorted(_REGISTRY)


def create_engine(name: str = "local", **options: Any) -> EmbedEngine:
    """Build the engine ``name`` with ``options`` (``None`` values are left to the engine's defaults)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise CppError(f"unknown engine {name!r}; known: {', '.join(list_engines())}") from None
    return factory(**{key: value for key, value in options.items() if value is not None})
