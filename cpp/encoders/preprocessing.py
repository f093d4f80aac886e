"""Split image preprocessing: geometry to uint8 on the CPU, normalisation batched on the encoder's device.

Decode workers then do the least work per image and ship a quarter of the bytes of a float tensor; the
normalisation of a whole batch is one vectorised operation (on the GPU when there is one). The geometry is
also available as data (:class:`ImageGeometry`) so that an engine can resize and crop decoded tensors on the
device instead of PIL images on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

#: Steps that only convert a PIL image's mode; decoded RGB tensors need nothing for them.
_MODE_STEPS = frozenset({"MaybeConvertMode", "_convert_to_rgb"})


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


@dataclass(frozen=True)
class ImageGeometry:
    """Resize, then optionally centre-crop, as data: the same geometry for PIL images and uint8 tensors.

    ``size`` is ``(s,)`` to scale the shorter side to ``s`` (aspect ratio kept, as ``transforms.Resize(s)``)
    or ``(h, w)`` for an exact size; ``crop`` is ``(h, w)`` or ``None``. Tensors are resized with
    antialiasing, which approximates PIL's filters closely (PIL always antialiases when downscaling).
    """

    size: tuple[int, ...]
    crop: tuple[int, int] | None
    interpolation: str  # an InterpolationMode value: "bicubic", "bilinear", "nearest", ...

    @property
    def min_source_size(self) -> tuple[int, int]:
        """The smallest ``(width, height)`` an image may have before this resize without being enlarged by
        it: the shorter side for ``(s,)`` (both sides at least ``s``), each side for ``(h, w)``."""
        if len(self.size) == 1:
            return (self.size[0], self.size[0])
        height, width = self.size
        return (width, height)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` a ``width`` x ``height`` image has after the resize (as torchvision's
        ``Resize`` computes it: the longer side scaled and truncated)."""
        if len(self.size) == 2:
            return (self.size[1], self.size[0])
        short = self.size[0]
        if width <= height:
            return (short, int(short * height / width))
        return (int(short * width / height), short)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Resize and crop a uint8 NCHW batch of equally sized images (on any device); uint8 out."""
        mode = InterpolationMode(self.interpolation)
        antialias = mode != InterpolationMode.NEAREST
        out = F.resize(batch, list(self.size), interpolation=mode, antialias=antialias)
        return out if self.crop is None else F.center_crop(out, list(self.crop))


def tensor_geometry(transform: transforms.Compose) -> ImageGeometry | None:
    """The :class:`ImageGeometry` of a uint8 transform from :func:`split_transform`, or ``None`` when it
    holds a step with no tensor equivalent here (e.g. open_clip's resize-longest-and-pad)."""
    steps = list(transform.transforms)
    if steps and isinstance(steps[-1], transforms.PILToTensor):
        steps.pop()
    steps = [step for step in steps if _step_name(step) not in _MODE_STEPS]
    if not steps or type(steps[0]) is not transforms.Resize or steps[0].max_size is not None:
        return None
    resize, rest = steps[0], steps[1:]
    size = (resize.size,) if isinstance(resize.size, int) else tuple(int(x) for x in resize.size)
    crop: tuple[int, int] | None = None
    if rest:
        if len(rest) > 1 or type(rest[0]) is not transforms.CenterCrop:
            return None
        height, width = rest[0].size
        crop = (int(height), int(width))
    return ImageGeometry(size=size, crop=crop, interpolation=resize.interpolation.value)


def _step_name(step: object) -> str:
    return getattr(step, "__name__", type(step).__name__)
