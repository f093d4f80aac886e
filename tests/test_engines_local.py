"""The local engine's CPU path: the windowed resize + centre crop, reduced-scale JPEG decoding, forward
passes in pieces, and what embedding imports."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from photos import photo_array
from PIL import Image
from skimage import data as skdata
from torchvision import transforms

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.encoders.effnet import EFFNET_ID
from cpp.encoders.preprocessing import ImageGeometry, tensor_geometry
from cpp.engines import LocalEngine
from cpp.engines.base import DecodedUnit, encode_unit, prepare_image, resize_crop
from cpp.options import SourceSpec
from cpp.store import FeatureStore

BICUBIC = transforms.InterpolationMode.BICUBIC


def _transform(size: int | tuple[int, int], crop: int | None, mode: Any = BICUBIC) -> transforms.Compose:
    steps: list[Any] = [transforms.Resize(size, interpolation=mode)]
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    return transforms.Compose([*steps, transforms.PILToTensor()])


def _photo(width: int, height: int) -> Image.Image:
    """A real photo resampled to ``width`` x ``height`` (odd sizes and aspect ratios included)."""
    return Image.fromarray(photo_array("astronaut")).resize((width, height), Image.Resampling.BICUBIC)


#: Photo sizes, odd aspect ratios and tall images (where PIL may take its passes in the other order).
SIZES = [(640, 480), (480, 640), (333, 500), (612, 612), (1000, 300), (641, 427), (300, 1000), (569, 1203)]


@pytest.mark.parametrize(
    "size, crop, mode",
    [
        (256, 224, BICUBIC),  # the offline encoder
        (224, 224, BICUBIC),  # open_clip ViT-B-32
        (64, 48, transforms.InterpolationMode.BILINEAR),
        ((240, 320), 224, BICUBIC),  # an exact size, then a crop
    ],
)
def test_windowed_resize_crop_gives_the_pixels_of_resize_then_centre_crop(
    size: int | tuple[int, int], crop: int, mode: Any
) -> None:
    transform = _transform(size, crop, mode)
    geometry = tensor_geometry(transform)
    assert geometry is not None
    for width, height in SIZES:
        image = _photo(width, height)
        expected = transform(image)
        window = resize_crop(image, geometry)
        assert window is not None and window.dtype == torch.uint8
        assert window.shape == expected.shape
        difference = (window.int() - expected.int()).abs()
        # rounding only: measured at most 4 levels of 255, mean at most 0.15
        assert int(difference.max()) <= 6 and float(difference.float().mean()) < 0.25, (width, height)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (333, 500), (640, 427)])
def test_windowed_resize_crop_of_usual_photos_is_within_one_level(width: int, height: int) -> None:
    """PIL resamples these horizontally first too; only its single-precision box rounds a few values."""
    transform = _transform(256, 224)
    geometry = tensor_geometry(transform)
    assert geometry is not None
    image = _photo(width, height)
    window = resize_crop(image, geometry)
    assert window is not None
    difference = (window.int() - transform(image).int()).abs()
    assert int(difference.max()) <= 1 and float((difference > 0).float().mean()) < 0.002


def test_windowed_resize_crop_declines_what_it_does_not_cover() -> None:
    image = _photo(320, 240)
    no_crop = ImageGeometry(size=(128,), crop=None, interpolation="bicubic")
    too_big = ImageGeometry(size=(100,), crop=(200, 200), interpolation="bicubic")  # torchvision pads
    unchanged = ImageGeometry(size=(240,), crop=(224, 224), interpolation="bicubic")  # no resize at all
    unknown_filter = ImageGeometry(size=(128,), crop=(64, 64), interpolation="nearest-exact")
    for geometry in (no_crop, too_big, unchanged, unknown_filter):
        assert resize_crop(image, geometry) is None


def test_prepare_image_falls_back_to_preprocess_exactly() -> None:
    transform = _transform(240, 224)
    geometry = tensor_geometry(transform)
    data = _jpeg(_photo(320, 240))  # already 240 high: torchvision does not resample, only crops
    expected = transform(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(prepare_image(data, transform, 10**8, geometry, draft=True), expected)


def _jpeg(image: Image.Image, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def test_prepare_image_drafts_only_when_asked_and_stays_close() -> None:
    transform = _transform(64, 64)
    geometry = tensor_geometry(transform)
    data = _jpeg(Image.fromarray(photo_array("astronaut")))  # 512 x 512: decoded at 1/4 (twice 64) drafted
    full = prepare_image(data, transform, 10**8)
    windowed = prepare_image(data, transform, 10**8, geometry)
    drafted = prepare_image(data, transform, 10**8, geometry, draft=True)
    assert int((windowed.int() - full.int()).abs().max()) <= 1
    difference = (drafted.float() - full.float()).abs()
    assert 0 < float(difference.mean()) < 2.0  # measured 0.89 levels of 255


class _RowEncoder(Encoder):
    """Features that depend on each image alone (its mean value), and a record of the batch sizes seen."""

    id = "row"
    dim = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[int] = []

    def preprocess(self, image: Image.Image) -> torch.Tensor:  # pragma: no cover - not used here
        raise NotImplementedError

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(batch))
        mean = batch.float().mean(dim=(1, 2, 3))
        return torch.nn.functional.normalize(torch.stack([mean, 255 - mean], dim=1), dim=-1)

    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - not used here

    def describe(self) -> dict[str, Any]:
        return {"id": self.id}


def test_encode_unit_in_forward_batches_gives_the_same_rows_in_order() -> None:
    batch = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 4, 4).contiguous()
    unit = DecodedUnit(start=0, size=41, batch=batch, failures={40: "broken"}, decode_s=0.5)
    whole, parts = _RowEncoder(), _RowEncoder()
    expected = encode_unit(unit, whole)
    encoded = encode_unit(unit, parts, forward_batch=16)
    assert whole.batches == [40] and parts.batches == [16, 16, 8]
    np.testing.assert_allclose(encoded.features, expected.features, rtol=1e-6)
    assert encoded.failures == {40: "broken"} and encoded.decode_s == 0.5
    with pytest.raises(ValueError, match="forward_batch"):
        encode_unit(unit, parts, forward_batch=0)


@pytest.fixture(scope="module")
def effnet() -> Encoder:
    return create_encoder(EFFNET_ID, device="cpu")


def _features(store_dir: Path) -> np.ndarray:
    return FeatureStore.open(store_dir).features(np.float32)


def test_drafted_features_agree_with_the_full_decode(tmp_path: Path, effnet: Encoder) -> None:
    """The retina photo (1411 px) is decoded at half scale (706 px, at least twice the 256 px target); the
    three photos under 1024 px are decoded in full either way."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(skdata.retina()).save(folder / "retina.jpg", quality=90)
    for name in ("chelsea", "coffee", "hubble"):
        Image.fromarray(photo_array(name)).save(folder / f"{name}.jpg", quality=90)
    spec = SourceSpec(type="folder", path=str(folder))
    engines = {"full": LocalEngine(0, draft=False), "draft": LocalEngine(0)}
    stores = {name: embed_source(spec, tmp_path / name, effnet, engine=e) for name, e in engines.items()}
    assert stores["draft"].meta["run"]["jpeg_draft"] is True
    assert stores["full"].meta["run"]["jpeg_draft"] is False
    full, drafted = _features(tmp_path / "full"), _features(tmp_path / "draft")
    cosines = (full * drafted).sum(axis=1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(drafted, axis=1))
    retina = [Path(row.path or "").name for row in stores["full"].rows()].index("retina.jpg")
    assert np.delete(cosines, retina).min() > 0.99999
    assert 0.995 < cosines[retina] < 0.99999  # measured 0.99895


def test_embedding_with_the_offline_encoder_imports_no_open_clip_web_framework_or_ray(
    photo_dir: Path, tmp_path: Path
) -> None:
    code = (
        "import sys; from cpp.cli import main; "
        f"code = main(['embed', {str(photo_dir)!r}, '--out', {str(tmp_path / 'store')!r}, "
        "'--model', 'effnet-lite0-in1k', '--quiet']); "
        "heavy = {'open_clip', 'fastapi', 'starlette', 'uvicorn', 'ray'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy)); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
