"""A registry of encoder factories keyed by spec prefix, as timm does for models."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from cpp.encoders.base import Encoder
from cpp.errors import CppError

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
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise CppError(f"invalid device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CppError(f"device {device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved


def create_encoder(spec: str = "auto", *, device: str | torch.device | None = None) -> Encoder:
    """Build an encoder from a spec: ``auto``, ``effnet-lite0-in1k`` or ``open_clip:<arch>/<tag-or-file>``."""
    name, _, arg = spec.partition(":")
    return encoder_factory(name)(arg, device=resolve_device(device))


def encoder_factory(name: str) -> EncoderFactory:
    """The factory registered under ``name`` (its docstring describes the encoder family)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CppError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}") from None
