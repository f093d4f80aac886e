"""The registry of embedding engines by name (``cpp embed --engine NAME``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cpp.engines.base import EmbedEngine
from cpp.registry import Registry

EngineFactory = Callable[..., EmbedEngine]

_ENGINES: Registry[EngineFactory] = Registry("engine")

#: Register ``fn(**options) -> EmbedEngine`` under a name; options it does not know are an error.
register_engine = _ENGINES.register
#: Names of all registered engines.
list_engines = _ENGINES.names


def create_engine(name: str = "local", **options: Any) -> EmbedEngine:
    """Build the engine ``name`` with ``options`` (``None`` values are left to the engine's defaults)."""
    return _ENGINES.get(name)(**{key: value for key, value in options.items() if value is not None})
