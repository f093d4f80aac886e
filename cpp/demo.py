"""The offline demo collection: scikit-image's sample photos, each as a dozen random crops and flips.

Seven subjects, each in its own folder (so the result carries ground-truth metrics), generated on the fly from
photos that scikit-image ships inside its package: no download needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from skimage import data as skdata

from cpp.options import SourceSpec

#: folder name -> loader of an (H, W[, 3]) uint8 photo
DEMO_SUBJECTS: dict[str, Callable[[], np.ndarray]] = {
    "cat": skdata.chelsea,
    "coffee": skdata.coffee,
    "rocket": skdata.rocket,
    "astronaut": skdata.astronaut,
    "motorcycle": lambda: skdata.stereo_motorcycle()[0],
    "coins": skdata.coins,
    "cameraman": skdata.camera,
}
VIEWS_PER_SUBJECT = 12
_SIDE = 224


def _augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (45–100 % of the area), maybe mirrored, with mild brightness/contrast changes."""
    width, height = photo.size
    scale = rng.uniform(0.45, 1.0)
    w = max(32, int(width * np.sqrt(scale)))
    h = max(32, int(height * np.sqrt(scale)))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    view = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.8, 1.2))
    view.thumbnail((_SIDE, _SIDE))
    return view


def make_demo_images(root: str | Path, *, views: int | None = None, seed: int = 0) -> SourceSpec:
    """Write ``views`` (default :data:`VIEWS_PER_SUBJECT`) photos per subject under ``root/<subject>/`` (once)
    and return the folder source for them."""
    views = VIEWS_PER_SUBJECT if views is None else views
    root = Path(root)
    for number, (subject, load) in enumerate(DEMO_SUBJECTS.items()):
        folder = root / subject
        paths = [folder / f"{subject}_{i:02d}.jpg" for i in range(views)]
        if all(p.is_file() for p in paths):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        photo = Image.fromarray(load()).convert("RGB")
        rng = np.random.default_rng([seed, number])
        for path in paths:
            _augment(photo, rng).save(path, quality=90)
    return SourceSpec(type="folder", path=str(root), labels_from_folders=True)
