"""Naming benchmark: how often clusters and images get a correct name; prints JSON.

A cluster is named correctly when its name is its majority ground-truth class's name or a listed synonym
(``--synonyms``: ``{"synonyms": {class: [names...]}}``); an image is labelled correctly when its own best
name is. Every binding space (raw features / through the head), method (centre / subspace / vote) and mean
centring is scored on the head's clusters and on the ground-truth partition (naming alone).

    python scripts/bench_naming.py --source /work/shared/datasets/cifar10/test --work-dir /tmp/bench-naming
    python scripts/bench_naming.py --features X.npy --labels y.npy --classes classes.json   # precomputed
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.head_model import FitConfig, FittedHead
from cpp.heads import HeadConfig
from cpp.labels import embed_vocabulary
from cpp.metrics import evaluate
from cpp.naming import NamingConfig, name_clusters
from cpp.options import SourceSpec
from cpp.readout import readout
from cpp.train import fit_head
from cpp.vocab import resolve_vocabulary

DEFAULT_SYNONYMS = Path(__file__).parent / "data" / "cifar10_imagenet1k_synonyms.json"


def load_features(args: argparse.Namespace, encoder: Encoder) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, integer true labels and class names, from a folder source (embedded by ``encoder``) or
    precomputed files."""
    if args.features:
        x = np.load(args.features).astype(np.float32)
        y = np.load(args.labels).astype(np.int64)
        classes = list(json.loads(Path(args.classes).read_text()))
        return x, y, classes
    spec = SourceSpec(type="folder", path=args.source, labels_from_folders=True)
    store = embed_source(spec, Path(args.work_dir) / "features", encoder, batch_size=args.batch_size)
    truth = [row.label or "" for row in store.rows()]
    classes = sorted(set(truth))
    index = {name: i for i, name in enumerate(classes)}
    return store.features(), np.array([index[t] for t in truth], dtype=np.int64), classes


def correct_name_table(
    classes: list[str], names: tuple[str, ...], synonyms: dict[str, list[str]]
) -> np.ndarray:
    """``(n_classes, V)`` bool: which vocabulary names count as correct for each class."""
    position = {name: i for i, name in enumerate(names)}
    table = np.zeros((len(classes), len(names)), dtype=bool)
    for c, cls in enumerate(classes):
        for name in [cls, *synonyms.get(cls, [])]:
            if name in position:
                table[c, position[name]] = True
    return table


def score_naming(
    partition: np.ndarray,
    y: np.ndarray,
    cluster_names: list[str],
    image_labels: np.ndarray,
    table: np.ndarray,
    names: tuple[str, ...],
) -> dict[str, float]:
    position = {name: i for i, name in enumerate(names)}
    correct = 0
    for j, name in enumerate(cluster_names):
        members = y[partition == j]
        if len(members):
            correct += bool(table[np.bincount(members).argmax(), position[name]])
    return {
        "clusters_named_correctly": correct,
        "clusters": len(cluster_names),
        "naming_accuracy": round(correct / max(len(cluster_names), 1), 4),
        "image_label_accuracy": round(float(table[y, image_labels].mean()), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", help="folder with one sub-folder per class")
    parser.add_argument("--features", help="precomputed (N, d) .npy features instead of --source")
    parser.add_argument("--labels", help="with --features: (N,) int .npy labels")
    parser.add_argument("--classes", help="with --features: JSON list of class names in label order")
    parser.add_argument("--work-dir", default="bench-naming-work")
    parser.add_argument("--model", default="effnet-lite0-in1k")
    parser.add_argument("--vocabulary", nargs="+", default=["imagenet1k"])
    parser.add_argument("--synonyms", default=str(DEFAULT_SYNONYMS))
    parser.add_argument("--clusters", default=None, help="number of clusters (default: number of classes)")
    parser.add_argument("--head", choices=["crate", "mlp"], default="crate")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: automatic)")
    parser.add_argument("--head-dir", help="load a fitted head from here instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.source and not (args.features and args.labels and args.classes):
        parser.error("give --source, or --features with --labels and --classes")
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}

    encoder = create_encoder(args.model, device=args.device)
    tick = time.perf_counter()
    x, y, classes = load_features(args, encoder)
    timings["features"] = time.perf_counter() - tick
    vocabulary = resolve_vocabulary(args.vocabulary)
    label_vectors = embed_vocabulary(encoder, vocabulary, cache_dir=Path(args.work_dir) / "labels")
    synonyms = json.loads(Path(args.synonyms).read_text())["synonyms"]
    table = correct_name_table(classes, vocabulary.names, synonyms)

    tick = time.perf_counter()
    if args.head_dir and Path(args.head_dir, "head.json").is_file():
        fitted = FittedHead.load(args.head_dir, device=args.device)
    else:
        fitted = fit_head(
            x, HeadConfig(type=args.head), FitConfig(epochs=args.epochs, seed=args.seed, device=args.device)
        )
        if args.head_dir:
            fitted.save(args.head_dir)
    timings["fit"] = time.perf_counter() - tick
    tick = time.perf_counter()
    k = int(args.clusters) if args.clusters else len(classes)
    result = readout(fitted, x, k, seed=args.seed)
    timings["readout"] = time.perf_counter() - tick

    rows: list[dict[str, Any]] = []
    partitions = {"head_clusters": result.labels, "true_classes": y}
    for (partition_name, partition), space, method, centre in itertools.product(
        partitions.items(), ("raw", "head"), ("centre", "subspace", "vote"), (True, False)
    ):
        config = NamingConfig(space=space, method=method, centre_features=centre, seed=args.seed)
        tick = time.perf_counter()
        naming = name_clusters(x, partition, label_vectors, vocabulary, config, fitted=fitted, z=result.z)
        row: dict[str, Any] = {
            "partition": partition_name,
            "space": space,
            "method": method,
            "centred": centre,
        }
        row.update(
            score_naming(
                partition, y, [c.name for c in naming.clusters], naming.image_labels, table, vocabulary.names
            )
        )
        row["uncertain"] = sum(c.uncertain for c in naming.clusters)
        row["names"] = [c.name for c in naming.clusters]
        row["seconds"] = round(time.perf_counter() - tick, 3)
        rows.append(row)

    report = {
        "benchmark": "naming",
        "data": args.source or args.features,
        "n": len(x),
        "classes": classes,
        "model": args.model,
        "vocabulary": args.vocabulary,
        "vocabulary_size": len(vocabulary),
        "head": fitted.head_config.model_dump(),
        "epochs": fitted.fit_config.epochs,
        "clustering": evaluate(y, result.labels),
        "k": result.k_selection.k,
        "timings_s": {name: round(v, 2) for name, v in timings.items()},
        "machine": {
            "platform": platform.platform(),
            "threads": args.threads,
            "python": sys.version.split()[0],
        },
        "results": rows,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
