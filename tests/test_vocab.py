"""Vocabularies: built-ins, user files, captions, and combining them."""

from __future__ import annotations

import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import open_clip
import pytest
from timm.data import ImageNetInfo

from cpp.vocab import (
    CAPTIONS,
    IMAGENET_MAPPED,
    IMAGENET_MAPS_FILE,
    SIMPLE_TEMPLATES,
    VocabularyError,
    builtin_vocabulary,
    captions_vocabulary,
    combine,
    imagenet_class_map,
    read_vocabulary_file,
    resolve_vocabulary,
)

IMAGENET_NAMES = list(open_clip.IMAGENET_CLASSNAMES)
MAKE_MAPS = Path(__file__).resolve().parent.parent / "scripts" / "make_vocab_maps.py"
WORDNET = Path("/usr/share/wordnet")


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


def test_templates_have_a_placeholder_and_are_open_clips() -> None:
    assert len(SIMPLE_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in SIMPLE_TEMPLATES)
    assert tuple(t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES) == SIMPLE_TEMPLATES


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


def _maps_file() -> dict[str, Any]:
    text = resources.files("cpp").joinpath("data", IMAGENET_MAPS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _classes_of(name: str) -> set[str]:
    return {IMAGENET_NAMES[i] for i in imagenet_class_map()[name]}


def test_imagenet_maps_cover_every_mapped_name_with_valid_classes() -> None:
    document = _maps_file()
    assert "scripts/make_vocab_maps.py" in document["made_by"] and "WordNet 3.0" in document["wordnet"]
    listed = {name for vocabulary in IMAGENET_MAPPED for name in builtin_vocabulary(vocabulary).names}
    assert set(document["names"]) == listed
    wnids = ImageNetInfo().label_names()
    for name, entry in document["names"].items():
        classes = entry["classes"]
        assert classes and len(set(classes)) == len(classes), name
        assert all(0 <= i < 1000 for i in classes), name
        assert entry["wnids"] == [wnids[i] for i in classes], name  # indices in the classifier's order
        assert entry["how"] and isinstance(entry["proxy"], bool), name
    assert imagenet_class_map() == {n: tuple(e["classes"]) for n, e in document["names"].items()}


def test_imagenet_map_spot_checks() -> None:
    assert {"tabby cat", "Siamese cat"} <= _classes_of("cat") and "cougar" not in _classes_of("cat")
    assert {"Golden Retriever", "Chihuahua"} <= _classes_of("dog") and len(_classes_of("dog")) == 118
    assert {"airliner", "military aircraft"} <= _classes_of("airplane")
    assert {"ambulance", "taxicab", "sports car"} <= _classes_of("automobile")
    assert {"scuba diver", "bridegroom", "baseball player"} == _classes_of("person")
    assert _classes_of("cell phone") == {"mobile phone"}
    assert _classes_of("mouse") == {"computer mouse"}
    assert {"soccer ball", "tennis ball"} <= _classes_of("sports ball")
    assert {"electric ray", "stingray"} == _classes_of("ray")
    proxies = {n for n, e in _maps_file()["names"].items() if e["proxy"]}
    assert {"giraffe", "deer", "kite", "cloud"} <= proxies and not {"dog", "cat", "tv"} & proxies


def test_imagenet_class_names_map_to_their_own_class() -> None:
    # the offline encoder resolves an ImageNet class name to its class first; the map must agree
    shared = [name for name in imagenet_class_map() if name in IMAGENET_NAMES]
    assert {"dining table", "orange", "tank", "couch"} <= set(shared)
    for name in shared:
        assert imagenet_class_map()[name] == (IMAGENET_NAMES.index(name),), name


@pytest.fixture(scope="module")
def make_maps() -> tuple[ModuleType, Any]:
    """The script as a module, and WordNet read once."""
    if not (WORDNET / "data.noun").is_file():
        pytest.skip("WordNet 3.0 is not installed (apt-get install wordnet-base)")
    spec = importlib.util.spec_from_file_location("make_vocab_maps", MAKE_MAPS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module, module.WordNet(WORDNET)


def test_committed_imagenet_maps_are_current(make_maps: tuple[ModuleType, Any]) -> None:
    module, wordnet = make_maps
    document, _ = module.build(wordnet)
    assert document["names"] == _maps_file()["names"], (
        f"cpp/data/{IMAGENET_MAPS_FILE} is stale: run python scripts/make_vocab_maps.py"
    )


def test_make_vocab_maps_refuses_unplaced_names_and_bad_entries(
    make_maps: tuple[ModuleType, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, wordnet = make_maps
    reviewed = module.OVERRIDES
    overrides = dict(reviewed)
    monkeypatch.setattr(module, "OVERRIDES", overrides)
    del overrides["giraffe"]
    with pytest.raises(module.MapError, match=r"'giraffe' maps to no ImageNet-1k class.*OVERRIDES"):
        module.build(wordnet)
    overrides["giraffe"] = module.Override("no classes", synsets=("giraffe.n.01",))
    with pytest.raises(module.MapError, match="entry of 'giraffe' maps to no ImageNet-1k class"):
        module.build(wordnet)
    overrides["giraffe"] = module.Override("typo", classes=("giraffe",))
    with pytest.raises(module.MapError, match="no ImageNet-1k class is named 'giraffe'"):
        module.build(wordnet)
    overrides["giraffe"] = module.Override("typo", synsets=("giraffe.n.09",))
    with pytest.raises(module.MapError, match=r"no sense 'giraffe\.n\.09'"):
        module.build(wordnet)
    overrides["giraffe"] = reviewed["giraffe"]
    overrides["orange"] = module.Override("the colour", synsets=("orange.n.02",))
    with pytest.raises(module.MapError, match="'orange' is an ImageNet-1k class name"):
        module.build(wordnet)
    del overrides["orange"]
    overrides["unicorn"] = module.Override("not listed", classes=("zebra",))
    with pytest.raises(module.MapError, match=r"no mapped vocabulary lists.*unicorn"):
        module.build(wordnet)
