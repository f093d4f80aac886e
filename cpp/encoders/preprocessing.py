"""Split image preprocessing: geometry to uint8 on the CPU, normalisation batched on the encoder's device.

Decode workers then do the least work per image and ship a quarter of the bytes of a float tensor; the
normalisation of a whole batch is one vectorised operation (on the GPU when there is one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms


class BatchNormaliser:
    """``(uint8 NCHW / 255 - mean) / std`` in the requested dtype, on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 batch from Encoder.preprocess, got {batch.dtype}")
        mean = self.mean.to(batch.device)
        scale = (255.0 * self.std).to(batch.device)
        return ((batch.float() - 255.0 * mean) / scale).to(dtype)


def split_transform(transform: transforms.Compose) -> tuple[transforms.Compose, BatchNormaliser]:
    """Turn a pipeline ending in ``ToTensor`` + ``Normalize`` into a uint8 CPU part and a batch normaliser."""
    steps = list(transform.transforms)
    if (
        len(steps) < 2
        or not isinstance(steps[-2], transforms.ToTensor)
        or not isinstance(steps[-1], transforms.Normalize)
    ):
        raise ValueError(f"expected a transform ending in ToTensor, Normalize; got {transform}")
    *geometry, _, normalize = steps
    return transforms.Compose([*geometry, transforms.PILToTensor()]), BatchNormaliser(
        normalize.mean, normalize.std
    )
