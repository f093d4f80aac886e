"""Label embeddings: a vocabulary turned into unit vectors in the encoder's image space, cached on disk.

Class names go through the encoder's text tower with a prompt ensemble (the templates' embeddings averaged and
re-normalised by the encoder); captions are embedded as they are. Encoders without a text tower (the offline
EfficientNet) answer with their classifier rows: their own classes, and the names of vocabularies mapped onto
them (:func:`cpp.vocab.imagenet_class_map`). Text-tower results are cached as ``.npy`` files keyed by a hash
of the encoder id, the names and the templates; classifier rows are built each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpp.encoders.base import Encoder, UnsupportedVocabulary
from cpp.knn import normalize_rows
from cpp.logging import get_logger
from cpp.progress import StageReporter
from cpp.vocab import CAPTIONS, SIMPLE_TEMPLATES, Vocabulary

log = get_logger("labels")

#: Captions are embedded verbatim: the identity template.
VERBATIM = ("{}",)


def default_cache_dir() -> Path:
    """``$CPP_CACHE_DIR/labels``, else ``$XDG_CACHE_HOME/cpp/labels``, else ``~/.cache/cpp/labels``."""
    root = os.environ.get("CPP_CACHE_DIR")
    if root:
        return Path(root) / "labels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cpp" / "labels"


def cache_key(encoder_id: str, vocabulary: Vocabulary, templates: Sequence[str]) -> str:
    """Hex digest identifying the embeddings of ``vocabulary`` under ``encoder_id`` and ``templates``."""
    payload = json.dumps(
        {
            "encoder": encoder_id,
            "names": vocabulary.names,
            "templated": vocabulary.templated,
            "templates": list(templates),
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def check_supported(encoder: Encoder, vocabulary: Vocabulary) -> None:
    """Raise :class:`UnsupportedVocabulary` for captions asked of an encoder without a text tower."""
    if encoder.has_text_tower:
        return
    if any(origin == CAPTIONS for origin in vocabulary.origins):
        raise UnsupportedVocabulary(
            f"the 'captions' vocabulary needs an encoder with a text tower; {encoder.id} has none. "
            "Use an open_clip model (--model open_clip:...) or a class-name vocabulary such as 'imagenet1k'."
        )


def embed_vocabulary(
    encoder: Encoder,
    vocabulary: Vocabulary,
    *,
    templates: Sequence[str] = SIMPLE_TEMPLATES,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    stage: StageReporter | None = None,
) -> np.ndarray:
    """``(len(vocabulary), encoder.dim)`` float32 unit rows, read from the cache when present.

    ``stage`` (optional) is advanced by one per name embedded. Raises :class:`UnsupportedVocabulary` when the
    encoder cannot embed some of the names.
    """
    if not len(vocabulary):
        raise ValueError("the vocabulary is empty")
    check_supported(encoder, vocabulary)
    if not encoder.has_text_tower:  # classifier rows: as cheap to build as to read, and never stale
        return _embed(encoder, vocabulary, templates, batch_size, stage)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{cache_key(encoder.id, vocabulary, templates)}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == (len(vocabulary), encoder.dim):
            log.debug("label embeddings from cache %s", path)
            if stage:
                stage.advance(len(vocabulary))
            return cached.astype(np.float32, copy=False)
        log.warning("ignoring label cache %s with shape %s", path, cached.shape)
    out = _embed(encoder, vocabulary, templates, batch_size, stage)
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(partial, out)
    os.replace(partial, path)
    return out


def _embed(
    encoder: Encoder,
    vocabulary: Vocabulary,
    templates: Sequence[str],
    batch_size: int,
    stage: StageReporter | None,
) -> np.ndarray:
    out = np.empty((len(vocabulary), encoder.dim), dtype=np.float32)
    flags = np.asarray(vocabulary.templated, dtype=bool)
    for templated, prompt in ((True, tuple(templates)), (False, VERBATIM)):
        rows = np.flatnonzero(flags == templated)
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            names = [vocabulary.names[i] for i in batch]
            out[batch] = encoder.embed_labels(names, prompt).float().numpy()
            if stage:
                stage.advance(len(batch))
    return normalize_rows(out)
