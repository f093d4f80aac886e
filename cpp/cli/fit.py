"""``cpp fit FEATURES --out RUN``: train a head on a feature store and read out clusters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cpp.cli.common import clusters_arg
from cpp.errors import CppError
from cpp.fit import FitConfig, fit_head
from cpp.heads import HeadConfig
from cpp.logging import get_logger
from cpp.progress import RunControl
from cpp.readout import readout
from cpp.store import FeatureStore

log = get_logger("cli.fit")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train a clustering head on stored features and assign clusters",
        description="Train a rate-reduction head on a feature store (from `cpp embed`), then cluster every "
        "sample. Writes head.safetensors + head.json, labels.npy, confidence.npy and readout.json to --out.",
    )
    parser.add_argument("features", type=Path, help="feature store directory written by `cpp embed`")
    parser.add_argument("--out", type=Path, required=True, help="output directory of the run")
    parser.add_argument("--clusters", type=clusters_arg, default="auto", help="'auto' (default) or a number")
    parser.add_argument("--head", choices=["crate", "mlp"], default="crate", help="head type (default crate)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: by data size)")
    parser.add_argument("--batch-size", type=int, default=FitConfig().batch_size)
    parser.add_argument("--context-k", type=int, default=HeadConfig().context_k, help="neighbour tokens")
    parser.add_argument(
        "--view-k", type=int, default=FitConfig().view_k, help="neighbours a training view is drawn from"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _open_store(path: Path) -> FeatureStore:
    """The store at ``path``; fit samples it and the readout streams it, so it is never loaded whole."""
    if not path.is_dir():
        raise CppError(f"{path} is not a directory: pass a feature store written by `cpp embed`")
    return FeatureStore.open(path)


def run(args: argparse.Namespace) -> int:
    try:
        head_config = HeadConfig(type=args.head, context_k=args.context_k)
        fit_config = FitConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            view_k=args.view_k,
            seed=args.seed,
            device=args.device,
        )
    except ValueError as exc:
        raise CppError(f"invalid option: {exc}") from exc
    features = _open_store(args.features)
    control = RunControl()
    fitted = fit_head(features, head_config, fit_config, control=control)
    out: Path = args.out
    fitted.save(out)
    result = readout(fitted, features, args.clusters, seed=args.seed, control=control)
    np.save(out / "labels.npy", result.labels)
    np.save(out / "confidence.npy", result.confidence)
    summary = {
        "k_selection": result.k_selection.model_dump(),
        "sizes": np.bincount(result.labels).tolist(),
        "final_loss": fitted.history[-1]["loss"] if fitted.history else None,
    }
    (out / "readout.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(result.labels)} samples in {result.k_selection.k} clusters; wrote {out}")
    return 0
