"""``cpp fit FEATURES --out RUN``: cluster and name a feature store into a clustering, as ``cpp cluster``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cpp.cli.common import add_option, check_output, options_from_args
from cpp.errors import CppError
from cpp.options import ClusterOptions, FitOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="cluster and name the images of a feature store (the stages of `cpp cluster` after embedding)",
        description="Train the clustering head on a feature store (from `cpp embed`), choose the clusters "
        "and name them with the store's own encoder, as `cpp cluster` does after embedding. --out becomes "
        "a clustering (manifest, head/, readout, revisions, result.json; see cpp/clustering.py) whose "
        "features/ is a symbolic link to FEATURES; `cpp assign`, `cpp export` and `cpp gallery` take it. "
        "Below 256 images no head is trained (the features are clustered directly), as in `cpp cluster`.",
    )
    parser.add_argument("features", type=Path, help="feature store directory written by `cpp embed`")
    parser.add_argument("--out", type=Path, required=True, help="output directory: the clustering")
    add_option(parser, ClusterOptions, "clusters", metavar="K")
    add_option(parser, ClusterOptions, "head", help="head type")
    add_option(parser, ClusterOptions, "vocabulary", metavar="VOCAB")
    add_option(parser, ClusterOptions, "epochs", help="training epochs", default_text="by data size")
    add_option(parser, FitOptions, "batch_size")
    add_option(parser, FitOptions, "context_k")
    add_option(parser, FitOptions, "view_k")
    add_option(parser, ClusterOptions, "seed", help="random seed")
    add_option(parser, ClusterOptions, "device")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, "--out", directory=True)  # before the slow imports: fails at once
    if not args.features.is_dir():
        raise CppError(f"{args.features} is not a directory: pass a feature store written by `cpp embed`")
    if out.resolve() == args.features.resolve():
        raise CppError(f"--out {args.out} is the feature store itself: give another directory for the run")
    # not --batch-size: here it is the training batch (FitOptions), not ClusterOptions' embedding batch
    options = options_from_args(
        ClusterOptions, args, "clusters", "head", "vocabulary", "epochs", "seed", "device"
    )
    from cpp.cli.cluster import format_summary
    from cpp.pipeline import cluster_features, head_configs
    from cpp.store import FeatureStore

    store = FeatureStore.open(args.features)
    head, fit = head_configs(len(store), options)
    configs = (
        head.model_copy(update={"context_k": args.context_k}),
        fit.model_copy(update={"batch_size": args.batch_size, "view_k": args.view_k}),
    )
    result = cluster_features(store.path, options, out, configs=configs)
    print(format_summary(result))
    print(f"\nclustering: {out}   (features: {store.path})")
    return 0
