"""Write cpp/data/imagenet_maps.json: each coco80, cifar10 and cifar100 name -> its ImageNet-1k classes.

    apt-get install wordnet-base          # the WordNet 3.0 database, in /usr/share/wordnet
    python scripts/make_vocab_maps.py [--wordnet /usr/share/wordnet] [--out cpp/data/imagenet_maps.json]

The offline encoder (``effnet-lite0-in1k``) has no text tower: it scores a name of these vocabularies by the
ImageNet-1k classes the name is mapped to here. ImageNet-1k classes are WordNet 3.0 noun synsets (wnid
``n01440764`` = offset 01440764 of WordNet's data.noun); their wnids in class-index order come from timm
(``timm.data.ImageNetInfo``). A name maps to, in this order of precedence:

1. its reviewed entry in :data:`OVERRIDES` (WordNet senses, ImageNet classes by name, or the classes under the
   nearest WordNet ancestor of a sense, for names whose own senses have none);
2. the class of that name, when the name is an ImageNet-1k class name as the ``imagenet1k`` vocabulary spells
   it (open_clip's class names), so that a name means the same in every vocabulary;
3. the ImageNet-1k classes that are its WordNet synset or its hyponyms (through hypernym and instance-hypernym
   links), for the name's most frequent noun sense that has any.

The script fails when a name maps to no class and has no entry in OVERRIDES, and on any entry it cannot
apply (unknown sense or class, no classes, a name no vocabulary lists, or a name that rule 2 decides). It
prints every name with its classes for review; entries marked ``proxy`` give classes that stand in for a name
ImageNet-1k lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import open_clip
from timm.data import ImageNetInfo

from cpp.vocab import IMAGENET_MAPPED, IMAGENET_MAPS_FILE, builtin_vocabulary

DEFAULT_WORDNET = Path("/usr/share/wordnet")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cpp" / "data" / IMAGENET_MAPS_FILE
#: How many levels above a sense ``relatives`` may climb to find ImageNet classes.
MAX_RELATIVE_LEVELS = 2


@dataclass(frozen=True)
class Override:
    """A reviewed mapping: the union of ``synsets``' classes, ``classes`` and ``relatives``' classes."""

    why: str
    #: WordNet senses as ``lemma.n.NN`` (NN: the sense number in WordNet's index.noun).
    synsets: tuple[str, ...] = ()
    #: ImageNet-1k classes by their ``imagenet1k`` name (open_clip's spelling).
    classes: tuple[str, ...] = ()
    #: A sense whose nearest ancestors with ImageNet classes (at most MAX_RELATIVE_LEVELS up) give classes.
    relatives: str = ""
    #: The classes stand in for the name: they are neither the named thing nor kinds of it.
    proxy: bool = False


PEOPLE = "ImageNet-1k has no classes of people by age or sex; its people are under person.n.01"
TREES = "ImageNet-1k has no trees; a scene with that tree is the stand-in"

OVERRIDES: dict[str, Override] = {
    # coco80 (cifar10 and cifar100 share some of these names)
    "airplane": Override(
        "ImageNet's military aircraft is a warplane, which WordNet puts beside airplane, not under it",
        synsets=("airplane.n.01", "warplane.n.01"),
    ),
    "motorcycle": Override(
        "ImageNet's motorcycles are the moped and the scooter ('vespa'), which WordNet puts beside it",
        synsets=("motorcycle.n.01", "motor_scooter.n.01"),
    ),
    "train": Override(
        "most ImageNet train photos are locomotives and railway cars, which WordNet has as parts of a train",
        synsets=("train.n.01", "locomotive.n.01", "car.n.02"),
    ),
    "fire hydrant": Override(
        "ImageNet-1k has no hydrant; the mailbox is the street fixture of like shape",
        classes=("mailbox",),
        proxy=True,
    ),
    "stop sign": Override(
        "not in WordNet; a stop sign is a street sign", classes=("traffic or street sign",)
    ),
    "cat": Override(
        "the house cat; cat.n.01 also covers the cougar and the lynx", synsets=("domestic_cat.n.01",)
    ),
    "cow": Override("cow.n.01 has no ImageNet class; its kind, cattle, has the ox", synsets=("cattle.n.01",)),
    "giraffe": Override(
        "ImageNet-1k has no giraffe; the other ruminants stand in", relatives="giraffe.n.01", proxy=True
    ),
    "handbag": Override(
        "WordNet's handbag sense has no ImageNet class; ImageNet's purse photos are handbags",
        classes=("purse",),
    ),
    "suitcase": Override(
        "ImageNet-1k has no luggage; the storage chest is the lidded case for belongings",
        classes=("storage chest",),
        proxy=True,
    ),
    "frisbee": Override(
        "ImageNet-1k has no Frisbee; the hockey puck is the thrown disk", classes=("hockey puck",), proxy=True
    ),
    "skis": Override("WordNet lists the singular; ImageNet has ski", synsets=("ski.n.01",)),
    "snowboard": Override(
        "ImageNet-1k has no snowboard; the ski is its snow sport", classes=("ski",), proxy=True
    ),
    "sports ball": Override(
        "not in WordNet; ImageNet's game balls (ball.n.01 without the punching bag)",
        classes=(
            "baseball",
            "basketball",
            "croquet ball",
            "golf ball",
            "ping-pong ball",
            "rugby ball",
            "soccer ball",
            "tennis ball",
            "volleyball",
        ),
    ),
    "kite": Override(
        "the toy (ImageNet's kite is the bird, kite.n.04); the parachute is the canopy flown in the sky",
        classes=("parachute",),
        proxy=True,
    ),
    "baseball bat": Override(
        "ImageNet-1k has no bat; the other baseball equipment stands in",
        relatives="baseball_bat.n.01",
        proxy=True,
    ),
    "baseball glove": Override(
        "ImageNet-1k has no glove; the other baseball equipment stands in",
        relatives="baseball_glove.n.01",
        proxy=True,
    ),
    "skateboard": Override(
        "ImageNet-1k has no skateboard; the unicycle is the small wheeled ride for one",
        classes=("unicycle",),
        proxy=True,
    ),
    "surfboard": Override(
        "ImageNet-1k has no surfboard; the surf's beach and sandbar stand in",
        classes=("beach", "sandbar"),
        proxy=True,
    ),
    "tennis racket": Override("ImageNet's class is its WordNet parent, the racket", classes=("racket",)),
    "wine glass": Override(
        "not in WordNet as two words; ImageNet has the goblet (a stemmed glass) and red wine",
        classes=("goblet", "red wine"),
        proxy=True,
    ),
    "cup": Override(
        "cup.n.01 has no ImageNet class; ImageNet's 'cup' (cup.n.06, a punch) photos are tea cups",
        classes=("tea cup", "coffee mug"),
    ),
    "fork": Override(
        "ImageNet-1k has no fork; the spatula is another utensil (the wooden spoon is the spoon's)",
        classes=("spatula",),
        proxy=True,
    ),
    "carrot": Override(
        "ImageNet-1k has no carrot; the butternut squash is the orange vegetable",
        classes=("butternut squash",),
        proxy=True,
    ),
    "donut": Override(
        "ImageNet-1k has no doughnut; the bagel is the ring-shaped baked good", classes=("bagel",), proxy=True
    ),
    "cake": Override(
        "ImageNet-1k has no cake; the trifle is the layered dessert", classes=("trifle",), proxy=True
    ),
    "potted plant": Override("not in WordNet; ImageNet has the flowerpot", classes=("plant pot",)),
    "toilet": Override("toilet.n.01 is the room; ImageNet has the toilet seat", classes=("toilet seat",)),
    "tv": Override(
        "ImageNet's television is television.n.02 (the system), not a sense of 'tv'; COCO's tv is VOC's "
        "tvmonitor, so the monitors too",
        classes=("television", "CRT monitor", "monitor"),
    ),
    "laptop": Override(
        "ImageNet has the laptop and the notebook computer", synsets=("laptop.n.01", "notebook.n.02")
    ),
    "mouse": Override(
        "coco80's computer mouse (mouse.n.04); cifar100's rodent (mouse.n.01) has no ImageNet-1k class and "
        "shares the name, so it is named by this sense too",
        synsets=("mouse.n.04",),
    ),
    "cell phone": Override(
        "not in WordNet as two words; ImageNet's cellular telephone", classes=("mobile phone",)
    ),
    "oven": Override("ImageNet's kitchen range is the stove", synsets=("oven.n.01",), classes=("stove",)),
    "book": Override(
        "book.n.01 has no ImageNet class; book covers, comics and bookcases stand in",
        classes=("dust jacket", "comic book", "bookcase"),
        proxy=True,
    ),
    "scissors": Override(
        "ImageNet-1k has no scissors; the other edge tools stand in", relatives="scissors.n.01", proxy=True
    ),
    "toothbrush": Override(
        "ImageNet-1k has no toothbrush; the other toiletries and brushes stand in",
        relatives="toothbrush.n.01",
        proxy=True,
    ),
    # cifar10
    "deer": Override(
        "ImageNet-1k has no deer; the other ruminants stand in", relatives="deer.n.01", proxy=True
    ),
    # cifar100
    "aquarium fish": Override(
        "not in WordNet; ImageNet's aquarium fish", classes=("goldfish", "rock beauty fish", "clownfish")
    ),
    "baby": Override(PEOPLE, synsets=("person.n.01",), proxy=True),
    "boy": Override(PEOPLE, synsets=("person.n.01",), proxy=True),
    "girl": Override(PEOPLE, synsets=("person.n.01",), proxy=True),
    "man": Override(PEOPLE, synsets=("person.n.01",), proxy=True),
    "woman": Override(PEOPLE, synsets=("person.n.01",), proxy=True),
    "caterpillar": Override(
        "ImageNet-1k has no larvae; the centipede is the long many-legged crawler",
        classes=("centipede",),
        proxy=True,
    ),
    "cloud": Override(
        "ImageNet-1k has no sky; the things photographed against it stand in",
        classes=("airship", "balloon", "parachute"),
        proxy=True,
    ),
    "flatfish": Override(
        "ImageNet-1k has no flatfish; the other spiny-finned fish stand in",
        relatives="flatfish.n.02",
        proxy=True,
    ),
    "forest": Override(
        "ImageNet-1k has no forest; the valley is its landscape", classes=("valley",), proxy=True
    ),
    "lamp": Override(
        "the furniture lamp (lamp.n.01 is any light source: candles, spotlights) and its shade",
        synsets=("lamp.n.02",),
        classes=("lampshade",),
    ),
    "maple tree": Override(TREES, classes=("valley",), proxy=True),
    "oak tree": Override(
        "ImageNet-1k has no trees; the oak's acorn stands in", classes=("acorn",), proxy=True
    ),
    "palm tree": Override(TREES, classes=("beach",), proxy=True),
    "pine tree": Override(TREES, classes=("mountain",), proxy=True),
    "willow tree": Override(TREES, classes=("lakeshore",), proxy=True),
    "pear": Override(
        "ImageNet-1k has no pear; the other edible fruit stand in", relatives="pear.n.01", proxy=True
    ),
    "plain": Override(
        "ImageNet-1k has no grassland; the hay and rapeseed fields stand in",
        classes=("hay", "rapeseed"),
        proxy=True,
    ),
    "poppy": Override(
        "ImageNet-1k has no poppy; the other flowers stand in", relatives="poppy.n.01", proxy=True
    ),
    "raccoon": Override(
        "ImageNet-1k has no raccoon; the other procyonids (the pandas) stand in",
        relatives="raccoon.n.02",
        proxy=True,
    ),
    "road": Override(
        "ImageNet-1k has no road; the street sign stands in", classes=("traffic or street sign",), proxy=True
    ),
    "rose": Override(
        "ImageNet-1k has no rose; its fruit, the rose hip, stands in", classes=("rose hip",), proxy=True
    ),
    "sea": Override(
        "ImageNet-1k has no open sea; its shore scenes stand in",
        classes=("beach", "sandbar", "promontory"),
        proxy=True,
    ),
    "shrew": Override(
        "ImageNet-1k has no insectivore; the weasel is the small pointed-snouted mammal",
        classes=("weasel",),
        proxy=True,
    ),
    "skyscraper": Override(
        "ImageNet-1k has no skyscraper; the other buildings stand in", relatives="skyscraper.n.01", proxy=True
    ),
    "sunflower": Override(
        "ImageNet-1k has no sunflower; the daisy is the other composite flower",
        classes=("daisy",),
        proxy=True,
    ),
    "table": Override(
        "the furniture senses (table.n.01 is a tabular array)", synsets=("table.n.02", "table.n.03")
    ),
    "trout": Override(
        "ImageNet-1k has no trout; the other salmonids and food fish stand in",
        relatives="trout.n.02",
        proxy=True,
    ),
    "tulip": Override("ImageNet-1k has no tulip; the flowers stand in", synsets=("flower.n.01",), proxy=True),
}


class MapError(Exception):
    """The maps cannot be made as reviewed; the message says which name or entry and what to do."""


class WordNet:
    """Noun synsets of a WordNet 3.0 database: lemmas, hypernyms, and each lemma's senses in order."""

    def __init__(self, root: Path) -> None:
        self.root = root
        data, index = root / "data.noun", root / "index.noun"
        for path in (data, index):
            if not path.is_file():
                raise MapError(f"{path} does not exist: install WordNet 3.0 (apt-get install wordnet-base)")
        text = data.read_text(encoding="latin-1")
        if "WordNet 3.0" not in text[:4000]:
            raise MapError(f"{data} is not WordNet 3.0, whose offsets ImageNet's wnids are")
        self.lemmas: dict[str, list[str]] = {}
        self.parents: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, words = fields[0], int(fields[3], 16)
            self.lemmas[offset] = [fields[4 + 2 * i] for i in range(words)]
            pointers = fields[5 + 2 * words :]
            self.parents[offset] = [
                pointers[4 * i + 1]
                for i in range(int(fields[4 + 2 * words]))
                if pointers[4 * i] in ("@", "@i") and pointers[4 * i + 2] == "n"
            ]
        self.senses: dict[str, list[str]] = {}
        for line in index.read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            self.senses[fields[0]] = fields[-int(fields[2]) :]

    def sense(self, spec: str) -> str:
        """The offset of ``lemma.n.NN``."""
        lemma, _, number = spec.rpartition(".n.")
        senses = self.senses.get(lemma, [])
        if not number.isdigit() or not 1 <= int(number) <= len(senses):
            raise MapError(f"WordNet has no sense {spec!r} ({lemma!r} has {len(senses)} noun senses)")
        return senses[int(number) - 1]

    def ancestors(self, offset: str, cache: dict[str, frozenset[str]]) -> frozenset[str]:
        """``offset`` and every synset above it."""
        if offset not in cache:
            found = {offset}
            for parent in self.parents[offset]:
                found |= self.ancestors(parent, cache)
            cache[offset] = frozenset(found)
        return cache[offset]

    def label(self, offset: str) -> str:
        return self.lemmas[offset][0]


class ImageNet:
    """The 1000 classes in the classifier's order: wnids (timm), names (open_clip), WordNet ancestors."""

    def __init__(self, wordnet: WordNet) -> None:
        self.wnids: list[str] = list(ImageNetInfo().label_names())
        self.names: list[str] = list(open_clip.IMAGENET_CLASSNAMES)
        if len(self.wnids) != 1000 or len(self.names) != 1000:
            raise MapError(
                f"expected 1000 ImageNet-1k classes, timm lists {len(self.wnids)}, open_clip names "
                f"{len(self.names)}"
            )
        missing = [w for w in self.wnids if w[1:] not in wordnet.lemmas]
        if missing:
            raise MapError(f"ImageNet wnids not in WordNet 3.0: {missing[:3]}")
        cache: dict[str, frozenset[str]] = {}
        self.ancestors = [wordnet.ancestors(w[1:], cache) for w in self.wnids]

    def under(self, offset: str) -> set[int]:
        """Classes that are the synset ``offset`` or its hyponyms."""
        return {i for i, above in enumerate(self.ancestors) if offset in above}

    def named(self, name: str) -> set[int]:
        found = {i for i, n in enumerate(self.names) if n == name}
        if not found:
            raise MapError(
                f"no ImageNet-1k class is named {name!r} (use the 'imagenet1k' vocabulary's spelling)"
            )
        return found


@dataclass(frozen=True)
class Mapped:
    classes: tuple[int, ...]
    how: str
    proxy: bool


def _relatives(wordnet: WordNet, imagenet: ImageNet, spec: str) -> tuple[set[int], list[str]]:
    """Classes under the nearest ancestors of ``spec`` that have any, and those ancestors' names."""
    frontier, seen = [wordnet.sense(spec)], set()
    for _ in range(MAX_RELATIVE_LEVELS + 1):
        found = set().union(*(imagenet.under(offset) for offset in frontier))
        if found:
            return found, [wordnet.label(offset) for offset in frontier]
        seen.update(frontier)
        frontier = [p for offset in frontier for p in wordnet.parents[offset] if p not in seen]
    raise MapError(
        f"no ImageNet-1k class within {MAX_RELATIVE_LEVELS} levels above {spec}; give classes instead"
    )


def _override(wordnet: WordNet, imagenet: ImageNet, name: str, entry: Override) -> Mapped:
    classes: set[int] = set()
    parts = []
    for spec in entry.synsets:
        classes |= imagenet.under(wordnet.sense(spec))
        parts.append(spec)
    for class_name in entry.classes:
        classes |= imagenet.named(class_name)
    if entry.classes:
        parts.append("classes " + ", ".join(entry.classes))
    if entry.relatives:
        found, above = _relatives(wordnet, imagenet, entry.relatives)
        classes |= found
        parts.append(f"classes under {'/'.join(above)} (above {entry.relatives})")
    if not classes:
        raise MapError(f"the OVERRIDES entry of {name!r} maps to no ImageNet-1k class; give classes")
    return Mapped(tuple(sorted(classes)), f"reviewed: {'; '.join(parts)} ({entry.why})", entry.proxy)


def map_name(wordnet: WordNet, imagenet: ImageNet, name: str) -> Mapped:
    """The classes of one vocabulary name, by the rules of this module's docstring."""
    is_class = name in imagenet.names
    if name in OVERRIDES:
        if is_class:
            raise MapError(
                f"{name!r} is an ImageNet-1k class name, which maps to its class: drop its OVERRIDES entry"
            )
        return _override(wordnet, imagenet, name, OVERRIDES[name])
    if is_class:
        return Mapped(tuple(sorted(imagenet.named(name))), "ImageNet-1k class name", False)
    for number, offset in enumerate(wordnet.senses.get(name.lower().replace(" ", "_"), []), start=1):
        classes = imagenet.under(offset)
        if classes:
            spec = f"{name.lower().replace(' ', '_')}.n.{number:02d}"
            return Mapped(tuple(sorted(classes)), f"wordnet: {spec} and its hyponyms", False)
    raise MapError(
        f"{name!r} maps to no ImageNet-1k class through WordNet; add a reviewed entry for it to OVERRIDES"
    )


def vocabulary_names() -> dict[str, list[str]]:
    """Each distinct name of the mapped vocabularies -> the vocabularies that list it, in listing order."""
    listed: dict[str, list[str]] = {}
    for vocabulary in IMAGENET_MAPPED:
        for name in builtin_vocabulary(vocabulary).names:
            listed.setdefault(name, []).append(vocabulary)
    return listed


def build(wordnet: WordNet) -> tuple[dict[str, Any], list[str]]:
    """The data file's content and the review table's lines."""
    imagenet = ImageNet(wordnet)
    listed = vocabulary_names()
    unused = sorted(set(OVERRIDES) - set(listed))
    if unused:
        raise MapError(f"OVERRIDES entries for names no mapped vocabulary lists: {unused}")
    names: dict[str, Any] = {}
    review = []
    for name, vocabularies in listed.items():
        mapped = map_name(wordnet, imagenet, name)
        names[name] = {
            "classes": list(mapped.classes),
            "wnids": [imagenet.wnids[i] for i in mapped.classes],
            "how": mapped.how,
            "proxy": mapped.proxy,
        }
        shown = ", ".join(imagenet.names[i] for i in mapped.classes[:6])
        more = f" (+{len(mapped.classes) - 6})" if len(mapped.classes) > 6 else ""
        review.append(
            f"{name:15} {','.join(vocabularies):16} {'proxy' if mapped.proxy else '':5} "
            f"{len(mapped.classes):3}  {shown}{more}  <- {mapped.how}"
        )
    proxies = sum(entry["proxy"] for entry in names.values())
    document = {
        "about": "Each name of the coco80, cifar10 and cifar100 vocabularies -> the ImageNet-1k classes that "
        "the offline encoder scores it by: 'classes' are indices in the classifier's order, 'wnids' their "
        "WordNet 3.0 ids, 'how' the rule or reviewed entry that chose them, 'proxy' whether they only stand "
        "in for a name ImageNet-1k lacks.",
        "made_by": "scripts/make_vocab_maps.py (see its docstring for the rules): reviewed overrides, else "
        "the ImageNet class of that name, else the ImageNet classes under the name's most frequent WordNet "
        "noun sense that has any",
        "wordnet": f"WordNet 3.0 noun database ({wordnet.root})",
        "imagenet": f"wnids in class-index order from timm {version('timm')} (timm.data.ImageNetInfo), "
        f"class names from open_clip {version('open_clip_torch')}",
        "vocabularies": list(IMAGENET_MAPPED),
        "counts": {"names": len(names), "proxies": proxies},
        "names": names,
    }
    return document, review


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=DEFAULT_WORDNET, help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the data file to write")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        document, review = build(WordNet(args.wordnet))
    except MapError as exc:
        print(f"make_vocab_maps: {exc}", file=sys.stderr)
        return 1
    print("\n".join(review))
    args.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = document["counts"]
    print(f"wrote {args.out}: {counts['names']} names, {counts['proxies']} of them proxies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
