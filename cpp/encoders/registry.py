"""A registry of encoder factories keyed by spec prefix, as timm does for models."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cpp.devices import resolve_device
from cpp.encoders.base import Encoder
from cpp.encoders.views import FLIP_VIEWS, FlipViews
from cpp.errors import CppError, OptionError
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


def create_encoder(spec: str = "auto", *, device: str | torch.device | None = None) -> Encoder:
    """Build an encoder from a spec: ``auto``, ``effnet-lite0-in1k`` or ``open_clip:<arch>/<tag-or-file>``,
    each optionally followed by ``+flip`` (:class:`cpp.encoders.views.FlipViews`: the mean of the features of
    each image and of its mirror image); an unknown name or an argument its factory refuses is an
    :class:`OptionError` of ``model``."""
    if spec.endswith(FLIP_VIEWS):
        return FlipViews(create_encoder(spec.removesuffix(FLIP_VIEWS), device=device))
    name, _, arg = spec.partition(":")
    try:
        factory = encoder_factory(name)
    except CppError as exc:
        raise OptionError("model", str(exc), value=spec) from None
    resolved = resolve_device(device)
    try:
        return factory(arg, device=resolved)
    except ValueError as exc:  # the factories' check of their argument
        raise OptionError("model", str(exc), value=spec) from exc
