"""A registry of encoder factories keyed by spec prefix, as timm does for models."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cpp.encoders.base import Encoder
from cpp.errors import CppError
from cpp.registry import Registry

EncoderFactory = Callable[..., Encoder]

_ENCODERS: Registry[EncoderFactory] = Registry("encoder")

#: Register ``fn(arg: str, *, device: torch.device) -> Encoder`` under a name; a spec ``name`` or
#: ``name:arg`` calls it with ``arg`` (empty when absent).
register_encoder = _ENCODERS.register
#: Names of all registered encoder families.
list_encoders = _ENCODERS.names
#: The factory registered under a name (its docstring describes the encoder family).
encoder_factory = _ENCODERS.get


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
