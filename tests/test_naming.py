"""Label embeddings (cache, prompt handling, offline encoder) and cluster naming strategies."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cpp.encoders import Encoder, UnsupportedVocabulary, create_encoder
from cpp.head_model import FitConfig
from cpp.heads import HeadConfig
from cpp.labels import VERBATIM, embed_vocabulary
from cpp.naming import NamingConfig, NamingMethod, labels_through_head, name_clusters
from cpp.options import ClusterOptions, SourceSpec
from cpp.pipeline import run_cluster
from cpp.train import fit_head
from cpp.vocab import SIMPLE_TEMPLATES, Vocabulary, builtin_vocabulary, captions_vocabulary, combine

DIM = 16


class FakeTextEncoder(Encoder):
    """A text tower that maps each name to a fixed random unit vector, and records its calls."""

    has_text_tower = True

    def __init__(self) -> None:
        self.id = "fake-text"
        self.dim = DIM
        self.device = torch.device("cpu")
        self.calls: list[tuple[list[str], tuple[str, ...]]] = []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError("not an image encoder")

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("not an image encoder")

    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        assert templates is not None
        self.calls.append((list(names), tuple(templates)))
        rows = [
            torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) for n in names
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "dim": self.dim}


def _names(*names: str) -> Vocabulary:
    return Vocabulary(tuple(names), ("test",) * len(names), (True,) * len(names))


def test_embed_vocabulary_batches_templates_and_cache(tmp_path: Path) -> None:
    encoder = FakeTextEncoder()
    vocabulary = combine([_names("cat", "dog", "ship"), captions_vocabulary(["a cat on a mat"])])
    vectors = embed_vocabulary(encoder, vocabulary, cache_dir=tmp_path, batch_size=2)
    assert vectors.shape == (4, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert encoder.calls == [
        (["cat", "dog"], SIMPLE_TEMPLATES),
        (["ship"], SIMPLE_TEMPLATES),
        (["a cat on a mat"], VERBATIM),
    ]
    again = embed_vocabulary(encoder, vocabulary, cache_dir=tmp_path)
    assert len(encoder.calls) == 3  # served from the cache
    np.testing.assert_array_equal(again, vectors)
    embed_vocabulary(encoder, vocabulary, templates=("a photo of a {}.",), cache_dir=tmp_path)
    assert len(encoder.calls) == 5  # other templates: another cache entry (names, then the caption)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_offline_encoder_names_imagenet_and_the_mapped_builtins(tmp_path: Path) -> None:
    encoder = create_encoder("effnet-lite0-in1k", device="cpu")
    imagenet = builtin_vocabulary("imagenet1k")
    classes = embed_vocabulary(encoder, imagenet, cache_dir=tmp_path)
    assert classes.shape == (len(imagenet), encoder.dim)
    for name in ("coco80", "cifar10", "cifar100"):
        vocabulary = builtin_vocabulary(name)
        vectors = embed_vocabulary(encoder, vocabulary, cache_dir=tmp_path)
        assert vectors.shape == (len(vocabulary), encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    coco = embed_vocabulary(encoder, builtin_vocabulary("coco80"), cache_dir=tmp_path)
    row = {name: coco[i] for i, name in enumerate(builtin_vocabulary("coco80").names)}
    by_class = {name: classes[i] for i, name in enumerate(imagenet.names)}
    np.testing.assert_allclose(row["dining table"], by_class["dining table"], atol=1e-6)  # its own class
    # a mapped name is the mean direction of its classes' rows
    cats = np.mean(
        [by_class[n] for n in ("tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau")], 0
    )
    np.testing.assert_allclose(row["cat"], cats / np.linalg.norm(cats), atol=1e-6)
    with pytest.raises(UnsupportedVocabulary, match=r"no text tower.*coco80, cifar10, cifar100.*'spaceship'"):
        embed_vocabulary(encoder, _names("cat", "spaceship"), cache_dir=tmp_path)
    with pytest.raises(
        UnsupportedVocabulary, match="'captions' vocabulary needs an encoder with a text tower"
    ):
        embed_vocabulary(encoder, captions_vocabulary(["a cat"]), cache_dir=tmp_path)


def test_offline_encoder_names_photos_from_coco80(photo_dir: Path, tmp_path: Path) -> None:
    options = ClusterOptions(model="effnet-lite0-in1k", device="cpu", vocabulary=["coco80"])
    result = run_cluster(SourceSpec(type="folder", path=str(photo_dir)), options, tmp_path / "work")
    coco = set(builtin_vocabulary("coco80").names)
    assert result.run.naming["names_by_origin"] == {"coco80": 80}
    assert all(c.name in coco and {a.name for a in c.alternatives} <= coco for c in result.clusters)
    assert result.assignments is not None
    labels = {Path(a.key).stem: a.label for a in result.assignments}
    assert (labels["chelsea"], labels["coffee"], labels["motorcycle"]) == ("cat", "cup", "motorcycle")


def _clustered(
    rng: np.random.Generator, anchors: np.ndarray, per: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(anchors)), per)
    x = anchors[labels] + noise * rng.standard_normal((len(labels), anchors.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("method", ["centre", "subspace", "vote"])
@pytest.mark.parametrize("centre", [True, False])
def test_each_method_finds_the_planted_names(method: NamingMethod, centre: bool) -> None:
    rng = np.random.default_rng(0)
    names = _names(*(f"name{i}" for i in range(12)))
    label_vectors = np.linalg.qr(rng.standard_normal((32, 12)))[0].T.astype(np.float32)  # orthonormal rows
    anchors = label_vectors[[3, 7, 1, 10]]
    x, labels = _clustered(rng, anchors, 20, 0.05)
    naming = name_clusters(
        x, labels, label_vectors, names, NamingConfig(method=method, centre_features=centre)
    )
    assert [c.name for c in naming.clusters] == ["name3", "name7", "name1", "name10"]
    assert all(
        len(c.alternatives) == 5 and c.name not in {a for a, _ in c.alternatives} for c in naming.clusters
    )
    assert all(c.score >= c.alternatives[0][1] for c in naming.clusters)
    np.testing.assert_array_equal(naming.image_labels, np.array([3, 7, 1, 10])[labels])


def test_uncertain_when_two_names_are_close() -> None:
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((32, 4)))[0].T.astype(np.float32)
    twin = basis[0] + 0.02 * basis[3]
    label_vectors = np.stack([basis[0], twin / np.linalg.norm(twin), basis[1], basis[2]]).astype(np.float32)
    x, labels = _clustered(rng, basis[[0, 1]], 20, 0.05)
    naming = name_clusters(
        x, labels, label_vectors, _names("a", "a2", "b", "c"), NamingConfig(centre_features=False)
    )
    assert naming.clusters[0].name in {"a", "a2"} and naming.clusters[0].uncertain
    assert naming.clusters[1].name == "b" and not naming.clusters[1].uncertain


def test_head_space_uses_labels_as_single_tokens() -> None:
    rng = np.random.default_rng(2)
    label_vectors = np.linalg.qr(rng.standard_normal((24, 6)))[0].T.astype(np.float32)
    x, labels = _clustered(rng, label_vectors[:3], 30, 0.05)
    head = HeadConfig(width=32, layers=1, heads=2, z_dim=8, context_k=2)
    fitted = fit_head(x, head, FitConfig(epochs=2, device="cpu", batch_size=32))
    z_labels = labels_through_head(fitted, label_vectors)
    assert z_labels.shape == (6, 8)
    naming = name_clusters(
        x, labels, label_vectors, _names(*"uvwxyz"), NamingConfig(space="head"), fitted=fitted
    )
    assert len(naming.clusters) == 3 and naming.image_labels.shape == (90,)
    with pytest.raises(ValueError, match="needs the fitted head"):
        name_clusters(x, labels, label_vectors, _names(*"uvwxyz"), NamingConfig(space="head"))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="label vectors"):
        name_clusters(
            np.ones((4, 3), np.float32), np.zeros(4, np.int64), np.ones((2, 3), np.float32), _names("a")
        )
