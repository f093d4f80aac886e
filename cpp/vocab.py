"""Vocabularies: the candidate names a cluster can be given.

A vocabulary spec is one of the built-in class lists (``imagenet1k``, ``coco80``, ``cifar10``, ``cifar100``),
``captions`` (the captions found in the source, used as whole descriptions), or the path of a text file with
one name per line. Several specs combine into one :class:`Vocabulary`; a name listed twice is kept once, with
the origin of its first listing.

Encoders without a text tower score class names through ImageNet-1k classes: ``imagenet1k`` names are the
classes themselves, and every name of ``coco80``, ``cifar10`` and ``cifar100`` is mapped to a set of them by
:func:`imagenet_class_map` (a data file made from WordNet 3.0 by ``scripts/make_vocab_maps.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from cpp.errors import CppError
from cpp.options import BUILTIN_VOCABULARIES, CAPTIONS
from cpp.sources import Roots, open_confined

#: The built-ins whose names are mapped to ImageNet-1k classes (for encoders without a text tower).
IMAGENET_MAPPED = ("coco80", "cifar10", "cifar100")
#: The data file of those maps, in ``cpp/data``.
IMAGENET_MAPS_FILE = "imagenet_maps.json"
DEFAULT_MAX_CAPTIONS = 5000

#: The prompt templates for class names ("{}" is replaced by the name), the one set cpp uses (naming and
#: the text-tower encoders' default): the seven-template subset of the ImageNet ensemble that open_clip ships
#: as SIMPLE_IMAGENET_TEMPLATES (tests/test_vocab.py checks they agree). Captions are embedded as they are.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


class VocabularyError(CppError):
    """A vocabulary spec or file cannot be used."""


@dataclass(frozen=True)
class Vocabulary:
    """Candidate names, each with its origin and whether prompt templates apply (names) or not (captions)."""

    names: tuple[str, ...]
    origins: tuple[str, ...]
    templated: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.origins) == len(self.templated):
            raise ValueError("names, origins and templated must have the same length")

    def __len__(self) -> int:
        return len(self.names)

    def sources(self) -> dict[str, int]:
        """How many names each origin contributed, in order of first appearance."""
        counts: dict[str, int] = {}
        for origin in self.origins:
            counts[origin] = counts.get(origin, 0) + 1
        return counts


def _normalise(name: str) -> str:
    """Collapse runs of whitespace; the comparison key used for de-duplication is this, lower-cased."""
    return re.sub(r"\s+", " ", name).strip()


def combine(vocabularies: Iterable[Vocabulary]) -> Vocabulary:
    """Concatenate vocabularies, keeping the first listing of names equal up to case and whitespace."""
    seen: set[str] = set()
    names: list[str] = []
    origins: list[str] = []
    templated: list[bool] = []
    for vocabulary in vocabularies:
        for name, origin, flag in zip(
            vocabulary.names, vocabulary.origins, vocabulary.templated, strict=True
        ):
            key = _normalise(name).lower()
            if key in seen:
                continue
            seen.add(key)
            names.append(_normalise(name))
            origins.append(origin)
            templated.append(flag)
    return Vocabulary(tuple(names), tuple(origins), tuple(templated))


def _of_names(names: Iterable[str], origin: str, *, templated: bool = True) -> Vocabulary:
    listed = [_normalise(n) for n in names]
    listed = [n for n in listed if n]
    return combine([Vocabulary(tuple(listed), (origin,) * len(listed), (templated,) * len(listed))])


def builtin_vocabulary(name: str) -> Vocabulary:
    """One of :data:`BUILTIN_VOCABULARIES`."""
    if name == "imagenet1k":
        from open_clip import IMAGENET_CLASSNAMES  # only here: importing open_clip takes seconds

        return _of_names(IMAGENET_CLASSNAMES, name)
    if name in BUILTIN_VOCABULARIES:
        text = resources.files("cpp").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
        return _of_names(text.splitlines(), name)
    raise VocabularyError(
        f"unknown built-in vocabulary {name!r}; built-ins are {', '.join(BUILTIN_VOCABULARIES)}"
    )


@cache
def imagenet_class_map() -> dict[str, tuple[int, ...]]:
    """Each name of :data:`IMAGENET_MAPPED` -> the indices of the ImageNet-1k classes it covers (one or more).

    Read from ``cpp/data/imagenet_maps.json``, which ``scripts/make_vocab_maps.py`` writes from WordNet 3.0 (a
    name maps to the ImageNet classes under its WordNet sense, or to a reviewed set where WordNet places none;
    the file records how each was chosen and which sets only stand in for a name ImageNet-1k lacks).
    """
    text = resources.files("cpp").joinpath("data", IMAGENET_MAPS_FILE).read_text(encoding="utf-8")
    return {name: tuple(entry["classes"]) for name, entry in json.loads(text)["names"].items()}


def read_vocabulary_file(path: str | Path, roots: Roots = None) -> Vocabulary:
    """Names from a UTF-8 text file, one per line; blank lines and lines starting with ``#`` are ignored.

    With ``roots``, the file is read only if it lies inside them (:func:`cpp.sources.open_confined`).
    """
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file {path} does not exist (give a file with one name per line)")
    try:
        with open_confined(path, roots) as handle:
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"cannot read vocabulary file {path}: {exc}") from exc
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    vocabulary = _of_names(lines, str(path))
    if not len(vocabulary):
        raise VocabularyError(
            f"vocabulary file {path} has no names (one name per line; '#' starts a comment)"
        )
    return vocabulary


def captions_vocabulary(captions: Iterable[str], *, limit: int = DEFAULT_MAX_CAPTIONS) -> Vocabulary:
    """Distinct captions as candidate descriptions; above ``limit``, an evenly spaced subset of them."""
    unique = combine([_of_names(captions, CAPTIONS, templated=False)])
    if len(unique) <= limit:
        return unique
    keep = np.linspace(0, len(unique) - 1, limit).round().astype(int)
    return Vocabulary(tuple(unique.names[i] for i in keep), (CAPTIONS,) * limit, (False,) * limit)


def resolve_vocabulary(
    specs: Sequence[str],
    *,
    captions: Iterable[str] | None = None,
    max_captions: int = DEFAULT_MAX_CAPTIONS,
    roots: Roots = None,
) -> Vocabulary:
    """Combine the vocabularies named by ``specs`` (built-in names, ``captions``, or file paths).

    ``captions`` are the source's captions; they are required when ``captions`` is among the specs. Files
    are read under ``roots`` only, when given.
    """
    if not specs:
        raise VocabularyError("no vocabulary given; use e.g. 'imagenet1k', 'captions' or a file of names")
    parts: list[Vocabulary] = []
    for spec in specs:
        if spec in BUILTIN_VOCABULARIES:
            parts.append(builtin_vocabulary(spec))
        elif spec == CAPTIONS:
            found = captions_vocabulary(captions or (), limit=max_captions)
            if not len(found):
                raise VocabularyError(
                    "the 'captions' vocabulary needs captions in the source (COCO captions annotations or "
                    "LAION-style .txt files beside the images), and this source has none"
                )
            parts.append(found)
        elif Path(spec).is_file():
            parts.append(read_vocabulary_file(spec, roots))
        else:
            raise VocabularyError(
                f"vocabulary {spec!r} is neither a built-in ({', '.join(BUILTIN_VOCABULARIES)}), "
                f"nor '{CAPTIONS}', nor an existing file of names"
            )
    return combine(parts)
