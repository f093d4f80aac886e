"""Encoders: a registry of image/label encoders picked by a spec string.

Importing this package registers every family without importing the libraries they need: open_clip is
imported when an open_clip model (or ``auto``, which looks for cached weights) is built, timm when the
offline encoder is.
"""

import torch

from cpp.encoders import auto as _auto  # noqa: F401  (registers the backend)
from cpp.encoders import effnet as _effnet  # noqa: F401  (registers the backend)
from cpp.encoders.base import Encoder, EncoderUnavailable, UnsupportedVocabulary
from cpp.encoders.registry import create_encoder, list_encoders, register_encoder


@register_encoder("open_clip")
def _create_open_clip(arg: str = "", *, device: torch.device) -> Encoder:
    """open_clip:<arch>/<pretrained tag or local checkpoint> (any open_clip model; fp16 on CUDA)."""
    from cpp.encoders.open_clip import create_open_clip

    return create_open_clip(arg, device=device)


__all__ = [
    "Encoder",
    "EncoderUnavailable",
    "UnsupportedVocabulary",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]
