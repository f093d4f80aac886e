"""Real photos from scikit-image for tests (importable helpers; the fixtures live in conftest.py)."""

from __future__ import annotations

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
