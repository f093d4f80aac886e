"""Shared fixtures: real photos from scikit-image and a tiny random-weight open_clip checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the network in tests

import pytest
from photos import PHOTOS, save_photo

TINY_CLIP_ARCH = "cpp-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def _photo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, (folder, _) in PHOTOS.items():
        save_photo(name, root / folder / f"{name}.jpg", quality=90)
    return root


@pytest.fixture
def photo_dir(_photo_cache: Path, tmp_path: Path) -> Path:
    """A fresh folder of 8 real photos as JPEG in 4 class subfolders (animals, people, objects, space)."""
    target = tmp_path / "photos"
    for source in sorted(_photo_cache.rglob("*.jpg")):
        destination = target / source.relative_to(_photo_cache)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(source.read_bytes())
    return target


@pytest.fixture(scope="session")
def tiny_clip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Encoder spec ``open_clip:<arch>/<file>`` of a tiny random-weight open_clip model saved to disk.

    The architecture config is written beside the checkpoint as ``<arch>.json`` so the spec also works in
    subprocesses (the encoder registers it from there).
    """
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / f"{TINY_CLIP_ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    checkpoint = root / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return f"open_clip:{TINY_CLIP_ARCH}/{checkpoint}"
