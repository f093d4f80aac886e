"""open_clip encoders: ``open_clip:<arch>/<pretrained-tag-or-local-file>``.

Weights are resolved to a local file before open_clip is called, so nothing waits on the network: a local
file is used as is, a pretrained tag is looked up in the Hugging Face / open_clip caches, and a download is
tried only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set. A custom architecture can be given
as an open_clip model config ``<arch>.json`` next to a local checkpoint.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image

from cpp.encoders.base import Encoder, EncoderUnavailable
from cpp.encoders.preprocessing import split_transform, tensor_geometry
from cpp.logging import get_logger
from cpp.vocab import SIMPLE_TEMPLATES

_log = get_logger(__name__)

_TEXT_BATCH = 256
_HF_HOST = "huggingface.co"


@dataclass(frozen=True)
class ResolvedWeights:
    """A local checkpoint and the preprocessing settings of its pretrained tag (if any)."""

    file: str
    tag: str | None
    preprocess: dict[str, Any]
    quick_gelu: bool


def parse_spec(arg: str) -> tuple[str, str]:
    """Split ``<arch>/<tag-or-file>`` at the first slash."""
    arch, slash, pretrained = arg.partition("/")
    if not arch or not slash or not pretrained:
        raise EncoderUnavailable(
            f"open_clip spec {arg!r} must be '<arch>/<pretrained tag or checkpoint file>', "
            "e.g. open_clip:ViT-B-32/laion2b_s34b_b79k or open_clip:ViT-B-32//path/to/weights.pt"
        )
    return arch, pretrained


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((_HF_HOST, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _cached_file(cfg: dict[str, Any]) -> str | None:
    """The locally cached weight file of a pretrained tag config, or ``None``."""
    if cfg.get("file"):
        return str(cfg["file"]) if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hub)  # "org/repo/file" or "org/repo/" (default file names)
        if not filename:
            names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        for name in names:
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        candidate = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(candidate):
            return candidate
    return None


def _how_to_fix(arch: str, tag: str, cfg: dict[str, Any]) -> str:
    where = cfg.get("hf_hub") or cfg.get("url") or "its download location"
    return (
        f"download the weights of {arch}/{tag} once where the network is available (from {where}, into the "
        "Hugging Face cache) or pass a local checkpoint file: "
        f"--model open_clip:{arch}/path/to/checkpoint.pt (or .bin/.safetensors)"
    )


def resolve_weights(arch: str, pretrained: str, *, allow_download: bool = True) -> ResolvedWeights:
    """Find the local checkpoint for ``arch``/``pretrained``; :class:`EncoderUnavailable` at once when it
    cannot be had (offline and not cached, unknown tag, missing file)."""
    if os.path.isfile(pretrained):
        return ResolvedWeights(os.path.abspath(pretrained), None, {}, False)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        looks_like_file = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_file:
            raise EncoderUnavailable(f"open_clip checkpoint file {pretrained!r} does not exist")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise EncoderUnavailable(
            f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of open_clip model {arch!r} "
            f"(known tags: {', '.join(tags) or 'none'})"
        )
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    quick_gelu = bool(cfg.get("quick_gelu", False))
    cached = _cached_file(cfg)
    if cached is not None:
        return ResolvedWeights(cached, pretrained, preprocess, quick_gelu)
    if not allow_download:
        raise EncoderUnavailable(
            f"weights of {arch}/{pretrained} are not cached; " + _how_to_fix(arch, pretrained, cfg)
        )
    if _hf_offline() or not _hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if _hf_offline() else f"{_HF_HOST} cannot be reached"
        raise EncoderUnavailable(
            f"weights of {arch}/{pretrained} are not cached and {reason}; "
            + _how_to_fix(arch, pretrained, cfg)
        )
    _log.info("downloading the weights of %s/%s", arch, pretrained)
    try:
        file = open_clip.download_pretrained(cfg)
    except Exception as exc:  # hub errors come in many types; the user needs the message
        raise EncoderUnavailable(
            f"downloading weights of {arch}/{pretrained} failed ({exc}); "
            + _how_to_fix(arch, pretrained, cfg)
        ) from exc
    return ResolvedWeights(file, pretrained, preprocess, quick_gelu)


def _ensure_arch(arch: str, weights_file: str) -> None:
    """Register ``<arch>.json`` beside a local checkpoint when open_clip does not know ``arch``."""
    if open_clip.get_model_config(arch) is not None:
        return
    config = Path(weights_file).with_name(f"{arch}.json")
    if config.is_file():
        open_clip.add_model_config(config)
    if open_clip.get_model_config(arch) is None:
        raise EncoderUnavailable(
            f"unknown open_clip architecture {arch!r}: use one of `open_clip.list_models()` or put its model "
            f"config as {config.name} next to the checkpoint"
        )


class OpenClipEncoder(Encoder):
    """An open_clip image tower for features and its text tower for the label space."""

    has_text_tower = True

    def __init__(self, arch: str, pretrained: str, weights: ResolvedWeights, device: torch.device) -> None:
        _ensure_arch(arch, weights.file)
        self.id = f"open_clip:{arch}/{pretrained if weights.tag else weights.file}"
        self.arch = arch
        self.device = device
        self.precision = "fp16" if device.type == "cuda" else "fp32"
        pre = weights.preprocess
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch,
                pretrained=weights.file,
                device=device,
                precision=self.precision,
                force_quick_gelu=weights.quick_gelu,
                image_mean=pre.get("mean"),
                image_std=pre.get("std"),
                image_interpolation=pre.get("interpolation"),
                image_resize_mode=pre.get("resize_mode"),
            )
            self._tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise EncoderUnavailable(
                f"cannot build open_clip model {arch} from {weights.file}: {exc}"
            ) from exc
        self.model = model.eval()
        self._preprocess, self._normalise = split_transform(preprocess)
        self.geometry = tensor_geometry(self._preprocess)
        self._weights = weights
        self.dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self._preprocess_info = _describe_transform(model)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        batch = self._normalise(batch.to(self.device, non_blocking=True), dtype)
        features = self.model.encode_image(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Prompt-ensemble text embeddings: mean of the normalised ``template.format(name)`` embeddings."""
        templates = tuple(templates) if templates else SIMPLE_TEMPLATES
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise ValueError(
                f"templates need a '{{}}' placeholder for the name, e.g. 'a photo of a {{}}.': {bad}"
            )
        prompts = [template.format(name) for name in names for template in templates]
        parts = []
        for start in range(0, len(prompts), _TEXT_BATCH):
            tokens = self._tokenizer(prompts[start : start + _TEXT_BATCH]).to(self.device)
            parts.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if not parts:
            return torch.zeros((0, self.dim))
        per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
        return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).cpu()

    def describe(self) -> dict[str, Any]:
        file = Path(self._weights.file)
        stat = file.stat()
        return {
            "id": self.id,
            "dim": self.dim,
            "architecture": f"open_clip/{self.arch}",
            "weights": {
                "tag": self._weights.tag,
                "file": str(file),
                "bytes": stat.st_size,
                "mtime": int(stat.st_mtime),
            },
            "preprocess": self._preprocess_info,
            "precision": self.precision,
            "device": str(self.device),
        }


def _describe_transform(model: Any) -> dict[str, Any]:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in dict(cfg).items()}


def create_open_clip(arg: str = "", *, device: torch.device) -> Encoder:
    """open_clip:<arch>/<pretrained tag or local checkpoint> (any open_clip model; fp16 on CUDA)."""
    arch, pretrained = parse_spec(arg)
    if open_clip.get_model_config(arch) is None and not os.path.isfile(pretrained):
        raise EncoderUnavailable(
            f"unknown open_clip architecture {arch!r} (see open_clip.list_models()); custom architectures "
            f"need a local checkpoint with {arch}.json beside it"
        )
    return OpenClipEncoder(arch, pretrained, resolve_weights(arch, pretrained), device)
