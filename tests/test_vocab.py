"""Vocabularies: built-ins, user files, captions, and combining them."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest

from cpp.vocab import (
    CAPTIONS,
    SIMPLE_TEMPLATES,
    VocabularyError,
    builtin_vocabulary,
    captions_vocabulary,
    combine,
    read_vocabulary_file,
    resolve_vocabulary,
)


@pytest.mark.parametrize(
    ("name", "size"), [("imagenet1k", 998), ("coco80", 80), ("cifar10", 10), ("cifar100", 100)]
)
def test_builtin_sizes_and_origin(name: str, size: int) -> None:
    vocabulary = builtin_vocabulary(name)
    assert len(vocabulary) == size
    assert set(vocabulary.origins) == {name}
    assert all(vocabulary.templated)


def test_imagenet_names_are_open_clips() -> None:
    # open_clip lists "missile" and "sunglasses" twice (two ImageNet classes each); names are kept once
    assert builtin_vocabulary("imagenet1k").names == tuple(dict.fromkeys(open_clip.IMAGENET_CLASSNAMES))


def test_builtin_spot_checks() -> None:
    assert builtin_vocabulary("cifar10").names[:3] == ("airplane", "automobile", "bird")
    assert "aquarium fish" in builtin_vocabulary("cifar100").names
    assert builtin_vocabulary("coco80").names[-1] == "toothbrush"
    with pytest.raises(VocabularyError, match="unknown built-in"):
        builtin_vocabulary("imagenet21k")


def test_templates_have_a_placeholder() -> None:
    assert len(SIMPLE_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in SIMPLE_TEMPLATES)


def test_user_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("# my labels\nred  fox\n\n  tabby cat \n# ignored\nRed fox\n", encoding="utf-8")
    vocabulary = read_vocabulary_file(path)
    assert vocabulary.names == ("red fox", "tabby cat")
    assert vocabulary.origins == (str(path), str(path))


def test_user_file_errors(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"missing\.txt does not exist"):
        read_vocabulary_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match="has no names"):
        read_vocabulary_file(empty)


def test_captions_are_deduplicated_untemplated_and_capped() -> None:
    captions = ["A cat on a mat.", "a cat  on a mat.", "A dog.", *[f"caption {i}" for i in range(10)]]
    vocabulary = captions_vocabulary(captions, limit=100)
    assert vocabulary.names[:2] == ("A cat on a mat.", "A dog.")
    assert len(vocabulary) == 12
    assert not any(vocabulary.templated)
    assert set(vocabulary.origins) == {CAPTIONS}
    capped = captions_vocabulary(captions, limit=4)
    assert len(capped) == 4
    assert capped.names[0] == "A cat on a mat." and capped.names[-1] == "caption 9"


def test_combine_keeps_first_origin(tmp_path: Path) -> None:
    path = tmp_path / "extra.txt"
    path.write_text("Airplane\nspaceship\n", encoding="utf-8")
    vocabulary = resolve_vocabulary(["cifar10", str(path)])
    assert len(vocabulary) == 11
    assert vocabulary.names.index("airplane") == 0
    assert vocabulary.origins[vocabulary.names.index("spaceship")] == str(path)
    assert vocabulary.sources() == {"cifar10": 10, str(path): 1}
    assert len(combine([vocabulary, vocabulary])) == 11


def test_resolve_with_captions() -> None:
    vocabulary = resolve_vocabulary(["cifar10", CAPTIONS], captions=["a red truck", "a red truck", "a ship"])
    assert vocabulary.names[-2:] == ("a red truck", "a ship")
    assert vocabulary.templated[-1] is False


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="no vocabulary"):
        resolve_vocabulary([])
    with pytest.raises(VocabularyError, match="this source has none"):
        resolve_vocabulary([CAPTIONS], captions=[])
    with pytest.raises(VocabularyError, match="neither a built-in"):
        resolve_vocabulary([str(tmp_path / "nope.txt")])
