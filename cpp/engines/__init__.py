"""Embedding engines: where units of images are decoded and encoded (see :mod:`cpp.engines.base`).

Engines register themselves by name (:func:`register_engine`); ``cpp embed --engine NAME`` picks one.
"""

from cpp.engines.base import DecodedUnit, EmbedEngine, EncodedUnit, decode_unit, encode_unit
from cpp.engines.local import LocalEngine, default_workers
from cpp.engines.registry import create_engine, list_engines, register_engine

__all__ = [
    "DecodedUnit",
    "EmbedEngine",
    "EncodedUnit",
    "LocalEngine",
    "create_engine",
    "decode_unit",
    "default_workers",
    "encode_unit",
    "list_engines",
    "register_engine",
]
