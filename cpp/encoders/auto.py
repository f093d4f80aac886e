"""``auto``: open_clip ViT-B-32 (LAION-2B) when its weights are cached here, else the offline encoder."""

from __future__ import annotations

import torch

from cpp.encoders.base import Encoder, EncoderUnavailable
from cpp.encoders.effnet import EFFNET_ID, EffNetLite0Encoder
from cpp.encoders.registry import register_encoder
from cpp.logging import get_logger

_log = get_logger(__name__)

AUTO_CLIP_ARCH = "ViT-B-32"
AUTO_CLIP_TAG = "laion2b_s34b_b79k"


def auto_choice() -> str:
    """The spec ``auto`` resolves to on this machine (no model is built)."""
    from cpp.encoders.open_clip import resolve_weights

    try:
        resolve_weights(AUTO_CLIP_ARCH, AUTO_CLIP_TAG, allow_download=False)
    except EncoderUnavailable:
        return EFFNET_ID
    return f"open_clip:{AUTO_CLIP_ARCH}/{AUTO_CLIP_TAG}"


@register_encoder("auto")
def create_auto(arg: str = "", *, device: torch.device) -> Encoder:
    """open_clip ViT-B-32/laion2b_s34b_b79k when its weights are cached, else effnet-lite0-in1k (offline)."""
    if arg:
        raise ValueError(f"auto takes no argument, got {arg!r}")
    from cpp.encoders.open_clip import OpenClipEncoder, resolve_weights

    try:
        weights = resolve_weights(AUTO_CLIP_ARCH, AUTO_CLIP_TAG, allow_download=False)
    except EncoderUnavailable as exc:
        _log.warning(
            "auto encoder: %s. Using the offline encoder %s instead (ImageNet-1k names only; "
            "pass --model open_clip:<arch>/<checkpoint> to use CLIP).",
            exc,
            EFFNET_ID,
        )
        return EffNetLite0Encoder(device)
    return OpenClipEncoder(AUTO_CLIP_ARCH, AUTO_CLIP_TAG, weights, device)
