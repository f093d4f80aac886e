"""A registry of encoder factories keyed by spec prefix, as timm does for models."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from cpp.encoders.base import Encoder

EncoderFactory = Callable[..., Encoder]
F = TypeVar("F", bound=EncoderFactory)

_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[F], F]:
    """Register ``fn(arg: str, *, device: torch.device) -> Encoder`` under ``name``.

    A spec ``name`` or ``name:arg`` calls it with ``arg`` (empty when absent).
    """

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_encoders() -> list[str]:
    """Names of all registered encoder families."""
    return sorted(_REGISTRY)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` means CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_encoder(spec: str = "auto", *, device: str | torch.device | None = None) -> Encoder:
    """Build an encoder from a spec such as ``auto``, ``effnet-lite0-in1k`` or ``open_clip:ViT-B-32/<tag-or-file>``."""
    name, _, arg = spec.partition(":")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown encoder {spec!r}; known: {', '.join(list_encoders())}") from None
    return factory(arg, device=resolve_device(device))
