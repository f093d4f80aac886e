"""Service test fixtures: settings in a temporary data folder, a test client over a scripted pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_testing import CountingEncoderFactory, FakePipeline

from cpp.service.app import create_app
from cpp.service.settings import Settings


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An allowed root holding a folder of four tiny PNGs in two class folders."""
    from PIL import Image

    root = tmp_path / "images"
    for i, cls in enumerate(["a", "a", "b", "b"]):
        (root / "set" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "set" / cls / f"{i}.png")
    return root


@pytest.fixture
def settings(tmp_path: Path, image_root: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        allowed_roots=[image_root],
        model="fake-model",
        allowed_models=["other-model"],
        devices=["cpu"],
        poll_interval_s=0.05,
        max_upload_bytes=2_000_000,
        max_upload_files=20,
        max_image_pixels=100_000,
        delete_wait_s=5,
    )


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def encoders() -> CountingEncoderFactory:
    return CountingEncoderFactory()


@pytest.fixture
def client(settings: Settings, fake: FakePipeline, encoders: CountingEncoderFactory) -> Iterator[TestClient]:
    with TestClient(create_app(settings, pipeline=fake, encoder_factory=encoders)) as test_client:
        yield test_client
