"""Views: an encoder whose features of an image are the mean of those of the image and of its mirror image.

Spec suffix :data:`FLIP_VIEWS` (``effnet-lite0-in1k+flip``): every image is encoded twice, as it is and
flipped left to right, and the two unit rows are averaged and normalised again. The mirror image is a
true second view of the same picture, so its average carries less of what one viewpoint adds (offline
encoder: 10-NN label purity 0.566 → 0.582 on CIFAR-10 and 0.310 → 0.324 on Tiny ImageNet 200; `cpp
cluster` ACC 0.443 → 0.445 and 0.349 → 0.354, NMI +0.9 and +0.7 points, 3 seeds:
docs/benchmarks/quality.md), at twice the forward passes. The description says so, so that stores,
heads and assignments made with and without it are never mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from cpp.encoders.base import Encoder

#: The spec suffix that wraps an encoder in :class:`FlipViews`.
FLIP_VIEWS = "+flip"


class FlipViews(Encoder):
    """``inner``'s features of each image averaged with those of its left-right mirror image."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.id = inner.id + FLIP_VIEWS
        self.dim = inner.dim
        self.device = inner.device
        self.has_text_tower = inner.has_text_tower
        self.geometry = inner.geometry

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.inner.preprocess(image)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        # Two passes of the caller's batch size (not one of twice the size): the same peak memory.
        both = self.inner.encode_images(batch) + self.inner.encode_images(batch.flip(-1))
        return F.normalize(both, dim=-1)

    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        return self.inner.embed_labels(names, templates)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "id": self.id, "views": "flip"}
