"""The encoder interface: images to L2-normalised features, and names to vectors in the same space."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from cpp.encoders.preprocessing import ImageGeometry
from cpp.errors import CppError


class EncoderUnavailable(CppError):
    """The encoder cannot be built here (e.g. weights cannot be had offline); the message says what to do."""


class UnsupportedVocabulary(CppError):
    """The encoder cannot embed the requested label names (e.g. no text tower)."""


class Encoder(ABC):
    """An image encoder with a label space.

    ``preprocess`` runs in decode workers (CPU, PIL in, uint8 CHW tensor out: resize and crop only);
    ``encode_images`` normalises the batch on the device, runs the forward pass and returns float32,
    L2-normalised rows on the CPU. ``geometry``, when set, is what ``preprocess`` does, as data, for
    engines that resize and crop decoded tensors on the device.
    """

    #: Registry spec that rebuilds this encoder, e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``.
    id: str
    #: Feature dimension.
    dim: int
    device: torch.device
    #: Whether :meth:`embed_labels` accepts arbitrary names (a text tower) or only a fixed label set.
    has_text_tower: bool = False
    #: The resize/crop of :meth:`preprocess` as data (``None``: it has no tensor equivalent).
    geometry: ImageGeometry | None = None

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop one RGB PIL image into a uint8 CHW tensor for :meth:`encode_images`."""

    @abstractmethod
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Encode a uint8 NCHW batch; returns an (N, dim) float32 CPU tensor with unit-norm rows."""

    @abstractmethod
    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Embed label names as (len(names), dim) float32 unit-norm rows.

        Raises :class:`UnsupportedVocabulary` for names the encoder cannot embed.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready description (id, dim, preprocessing, precision) recorded in every output."""
