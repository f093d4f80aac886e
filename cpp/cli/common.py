"""Options shared by several commands: the SOURCE options, the embedding engine and ``--clusters``."""

from __future__ import annotations

import argparse
from typing import Literal

from cpp.engines import EmbedEngine, create_engine, list_engines
from cpp.errors import CppError
from cpp.options import SourceSpec
from cpp.sources import infer_source_spec

MIN_CLUSTERS = 2


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--source-type``, ``--labels-from-folders`` and ``--annotations``."""
    parser.add_argument(
        "--source-type",
        choices=["folder", "files", "webdataset", "coco"],
        default=None,
        help="source type (default: inferred from SOURCE)",
    )
    parser.add_argument(
        "--labels-from-folders", action="store_true", help="folder sources: parent folder = label"
    )
    parser.add_argument(
        "--annotations", nargs="+", default=[], help="coco sources: instances/captions JSON files"
    )


def source_from_args(args: argparse.Namespace) -> SourceSpec:
    """The source that ``args.source`` and the options of :func:`add_source_arguments` describe."""
    return infer_source_spec(
        args.source,
        args.source_type,
        labels_from_folders=args.labels_from_folders,
        annotations=args.annotations,
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--workers`` (engines on this machine) and the Ray engine's ``--ray-*`` options."""
    parser.add_argument(
        "--engine",
        choices=list_engines(),
        default="local",
        help="where images are decoded and encoded: local (default; PIL decoding on this machine's CPUs), "
        "device (JPEGs decoded in batches on the encoder's device, e.g. nvJPEG), auto (device when the "
        "encoder runs on CUDA, else local), ray (Ray Data actors here or on a Ray cluster; needs cpp[ray])",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode worker processes on this machine (not with --engine ray; default: by device)",
    )
    group = parser.add_argument_group("ray engine (--engine ray)")
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. 'auto' or 'ray://head:10001' (default: $RAY_ADDRESS, else Ray "
        "is started on this machine)",
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="embedding actors (default: one per GPU, or CPU)",
    )
    group.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per actor (default: 1 when --device resolves to CUDA here, else 0)",
    )
    group.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=None,
        metavar="C",
        help="CPUs (decode threads) per actor (default: 1; GPU actors: the cluster's CPUs per GPU, up to 8)",
    )


def engine_from_args(args: argparse.Namespace) -> EmbedEngine:
    """The engine that the options of :func:`add_engine_arguments` ask for; options of another engine are
    an error."""
    ray_options = {
        "address": args.ray_address,
        "actors": args.ray_actors,
        "gpus_per_actor": args.ray_gpus_per_actor,
        "cpus_per_actor": args.ray_cpus_per_actor,
    }
    if args.engine == "ray":
        if args.workers is not None:
            raise CppError(
                "--workers sets the local engine's decode processes; with --engine ray use --ray-actors"
            )
        return create_engine("ray", **ray_options)
    given = [f"--ray-{name.replace('_', '-')}" for name, value in ray_options.items() if value is not None]
    if given:
        raise CppError(f"{', '.join(given)} need --engine ray")
    try:
        return create_engine(args.engine, workers=args.workers)
    except ValueError as exc:  # e.g. a negative --workers
        raise CppError(f"--engine {args.engine}: {exc}") from exc


def clusters_arg(value: str) -> Literal["auto"] | int:
    """argparse type of ``--clusters``: ``auto`` or a whole number of at least 2."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number, got {value!r}") from None
    if k < MIN_CLUSTERS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_CLUSTERS}, got {k}")
    return k
