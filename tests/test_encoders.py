"""Encoders: the tiny random-weight open_clip checkpoint through the real spec path, offline failures,
``auto`` and the offline encoder's ImageNet predictions on real photos."""

from __future__ import annotations

import logging
import time

import open_clip
import pytest
import torch
from photos import photo_array
from PIL import Image

from cpp.encoders import Encoder, EncoderUnavailable, UnsupportedVocabulary, create_encoder
from cpp.encoders.auto import auto_choice
from cpp.encoders.effnet import EFFNET_ID
from cpp.encoders.views import FLIP_VIEWS, FlipViews
from cpp.errors import OptionError


@pytest.fixture(scope="module")
def effnet() -> Encoder:
    return create_encoder(EFFNET_ID, device="cpu")


def _batch(encoder: Encoder, *names: str) -> torch.Tensor:
    return torch.stack([encoder.preprocess(Image.fromarray(photo_array(name))) for name in names])


def test_tiny_open_clip_from_local_checkpoint(tiny_clip_spec: str) -> None:
    encoder = create_encoder(tiny_clip_spec, device="cpu")
    assert encoder.id == tiny_clip_spec and encoder.dim == 32 and encoder.has_text_tower
    description = encoder.describe()
    assert description["precision"] == "fp32" and description["weights"]["tag"] is None
    features = encoder.encode_images(_batch(encoder, "chelsea", "coffee", "rocket"))
    assert features.shape == (3, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))

    labels = encoder.embed_labels(["cat", "cup of coffee"], ["a photo of a {}.", "a drawing of a {}."])
    assert labels.shape == (2, 32)
    torch.testing.assert_close(labels.norm(dim=1), torch.ones(2))
    tokenizer = open_clip.get_tokenizer("cpp-tiny-clip")
    model = encoder.model  # type: ignore[attr-defined]
    with torch.inference_mode():
        single = torch.nn.functional.normalize(model.encode_text(tokenizer(["a photo of a cat."])), dim=-1)
        drawing = torch.nn.functional.normalize(model.encode_text(tokenizer(["a drawing of a cat."])), dim=-1)
    expected = torch.nn.functional.normalize(single + drawing, dim=-1)[0]
    torch.testing.assert_close(labels[0], expected, atol=1e-5, rtol=1e-5)
    assert encoder.embed_labels([f"name {i}" for i in range(70)]).shape == (70, 32)  # > one text batch
    with pytest.raises(ValueError, match="placeholder"):
        encoder.embed_labels(["cat"], ["no placeholder"])


def test_open_clip_fails_fast_offline_with_advice() -> None:
    started = time.perf_counter()
    with pytest.raises(EncoderUnavailable, match="local checkpoint") as info:
        create_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - started < 5
    assert "open_clip:ViT-B-32/path/to/checkpoint.pt" in str(info.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("open_clip:ViT-B-32/no_such_tag", "neither a checkpoint file nor a pretrained tag"),
        ("open_clip:ViT-B-32//no/such/file.pt", "does not exist"),
        ("open_clip:ViT-B-32", "must be '<arch>/"),
        ("open_clip:No-Such-Arch/x.pt", "unknown open_clip architecture"),
    ],
)
def test_open_clip_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(EncoderUnavailable, match=message):
        create_encoder(spec, device="cpu")


def test_auto_falls_back_to_offline_encoder_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    if auto_choice() != EFFNET_ID:
        pytest.skip("the ViT-B-32 laion2b weights are cached on this machine, so auto picks CLIP")
    logger = logging.getLogger("cpp")
    logger.addHandler(caplog.handler)
    try:
        encoder = create_encoder("auto", device="cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert encoder.id == EFFNET_ID
    assert any("offline encoder" in record.getMessage() for record in caplog.records)


def test_offline_encoder_names_real_photos(effnet: Encoder) -> None:
    names = list(open_clip.IMAGENET_CLASSNAMES)
    labels = effnet.embed_labels(names)
    features = effnet.encode_images(_batch(effnet, "chelsea", "coffee"))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))
    top5 = [[names[i] for i in row] for row in (features @ labels.T).topk(5).indices.tolist()]
    assert {"tabby cat", "tiger cat", "Egyptian Mau"} & set(top5[0]), top5[0]
    assert {"espresso", "cup", "coffee mug", "tea cup"} & set(top5[1]), top5[1]
    with pytest.raises(UnsupportedVocabulary, match="no text tower"):
        effnet.embed_labels(["not an imagenet class"])


def test_uint8_preprocessing_matches_the_float_transform() -> None:
    from torchvision import transforms

    from cpp.encoders.preprocessing import split_transform

    full = transforms.Compose(
        [
            transforms.Resize(40),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)),
        ]
    )
    geometry, normalise = split_transform(full)
    image = Image.fromarray(photo_array("coffee"))
    raw = geometry(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    torch.testing.assert_close(normalise(raw[None])[0], full(image), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        normalise(raw[None].float())
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_transform(transforms.Compose([transforms.Resize(40)]))


def test_flip_views_average_the_image_and_its_mirror(effnet: Encoder) -> None:
    flipped = create_encoder(f"{EFFNET_ID}{FLIP_VIEWS}", device="cpu")
    assert isinstance(flipped, FlipViews) and flipped.id == f"{EFFNET_ID}{FLIP_VIEWS}"
    assert flipped.describe()["views"] == "flip" and flipped.describe()["id"] == flipped.id
    assert "views" not in effnet.describe() and flipped.dim == effnet.dim
    batch = _batch(effnet, "chelsea", "coffee")
    mirrored = batch.flip(-1)
    expected = torch.nn.functional.normalize(
        effnet.encode_images(batch) + effnet.encode_images(mirrored), dim=-1
    )
    torch.testing.assert_close(flipped.encode_images(batch), expected)
    torch.testing.assert_close(
        flipped.encode_images(mirrored), flipped.encode_images(batch), atol=1e-5, rtol=0
    )
    assert (flipped.encode_images(batch) * effnet.encode_images(batch)).sum(1).min() < 0.999  # a second view
    torch.testing.assert_close(flipped.embed_labels(["tabby cat"]), effnet.embed_labels(["tabby cat"]))
    with pytest.raises(OptionError, match="model"):
        create_encoder(f"no-such-encoder{FLIP_VIEWS}", device="cpu")
