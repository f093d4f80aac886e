"""Encoders: a registry of image/label encoders picked by a spec string."""

from cpp.encoders import auto as _auto  # noqa: F401  (registers the backend)
from cpp.encoders import effnet as _effnet  # noqa: F401  (registers the backend)
from cpp.encoders import open_clip as _open_clip  # noqa: F401  (registers the backend)
from cpp.encoders.base import Encoder, EncoderUnavailable, UnsupportedVocabulary
from cpp.encoders.registry import create_encoder, list_encoders, register_encoder

__all__ = [
    "Encoder",
    "EncoderUnavailable",
    "UnsupportedVocabulary",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]
