"""Embedding engines: where units of images are decoded and encoded (see :mod:`cpp.engines.base`).

Engines register themselves by name (:func:`register_engine`); ``cpp embed --engine NAME`` picks one:
``local`` (PIL decode in CPU workers), ``device`` (JPEGs decoded in batches on the encoder's device) or
``auto`` (``device`` when the encoder runs on CUDA, else ``local``).
``ray`` is always registered but imports Ray only when used: without ``cpp[ray]`` installed, asking for it
raises :class:`~cpp.engines.ray.RayEngineError` saying how to install it.
"""

from cpp.engines.base import DecodedUnit, EmbedEngine, EncodedUnit, decode_unit, encode_unit
from cpp.engines.device import AutoEngine, DeviceDecodeEngine
from cpp.engines.local import LocalEngine, default_workers
from cpp.engines.ray import RayEngine, RayEngineError
from cpp.engines.registry import create_engine, list_engines, register_engine

__all__ = [
    "AutoEngine",
    "DecodedUnit",
    "DeviceDecodeEngine",
    "EmbedEngine",
    "EncodedUnit",
    "LocalEngine",
    "RayEngine",
    "RayEngineError",
    "create_engine",
    "decode_unit",
    "default_workers",
    "encode_unit",
    "list_engines",
    "register_engine",
]
