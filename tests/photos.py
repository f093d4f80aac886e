"""Real photos from scikit-image for tests, and webdataset shards of them (importable helpers; the fixtures
live in conftest.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

# name -> (class folder, skimage loader)
PHOTOS = {
    "chelsea": ("animals", skdata.chelsea),
    "motorcycle": ("objects", lambda: skdata.stereo_motorcycle()[0]),
    "astronaut": ("people", skdata.astronaut),
    "coffee": ("objects", skdata.coffee),
    "rocket": ("objects", skdata.rocket),
    "hubble": ("space", skdata.hubble_deep_field),
    "camera": ("people", skdata.camera),
    "coins": ("objects", skdata.coins),
}


def photo_array(name: str) -> np.ndarray:
    """An skimage sample photo as an (H, W, 3) uint8 array."""
    array = PHOTOS[name][1]()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def save_photo(name: str, path: Path, **save_kwargs: object) -> Path:
    """Save an skimage sample photo; the format follows the suffix of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_array(name)).save(path, **save_kwargs)  # type: ignore[arg-type]
    return path


def write_shard(path: Path, samples: dict[str, tuple[bytes, str]]) -> None:
    """A webdataset shard as img2dataset writes it: ``{key}.jpg``, ``{key}.txt`` (caption), ``{key}.json``."""
    with tarfile.open(path, "w") as archive:
        for key, (image, caption) in samples.items():
            meta = {"key": key, "caption": caption, "url": f"https://example.com/{key}.jpg"}
            for name, data in (
                (f"{key}.jpg", image),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
