"""``cpp fit FEATURES --out RUN``: train a head on a feature store and read out clusters."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpp.cli.common import add_option, atomic_output, check_output
from cpp.errors import CppError
from cpp.options import ClusterOptions, FitOptions

if TYPE_CHECKING:
    import numpy as np

    from cpp.store import FeatureStore


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="train a clustering head on stored features and assign clusters",
        description="Train a rate-reduction head on a feature store (from `cpp embed`), then cluster every "
        "sample. Writes head.safetensors + head.json, labels.npy, confidence.npy and readout.json to --out.",
    )
    parser.add_argument("features", type=Path, help="feature store directory written by `cpp embed`")
    parser.add_argument("--out", type=Path, required=True, help="output directory of the run")
    add_option(parser, ClusterOptions, "clusters", metavar="K")
    add_option(parser, ClusterOptions, "head", help="head type")
    add_option(parser, ClusterOptions, "epochs", help="training epochs", default_text="by data size")
    add_option(parser, FitOptions, "batch_size")
    add_option(parser, FitOptions, "context_k")
    add_option(parser, FitOptions, "view_k")
    add_option(parser, ClusterOptions, "seed", help="random seed")
    add_option(parser, ClusterOptions, "device")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _open_store(path: Path) -> FeatureStore:
    """The store at ``path``; fit samples it and the readout streams it, so it is never loaded whole."""
    from cpp.store import FeatureStore

    if not path.is_dir():
        raise CppError(f"{path} is not a directory: pass a feature store written by `cpp embed`")
    return FeatureStore.open(path)


def _save_array(path: Path, array: np.ndarray) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with atomic_output(path) as partial:
        partial.write_bytes(buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, "--out", directory=True)  # before the slow imports: fails at once
    features = _open_store(args.features)
    import numpy as np

    from cpp.head_model import FitConfig
    from cpp.heads import HeadConfig
    from cpp.progress import RunControl
    from cpp.readout import readout
    from cpp.train import fit_head

    head_config = HeadConfig(type=args.head, context_k=args.context_k)
    fit_config = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        view_k=args.view_k,
        seed=args.seed,
        device=args.device,
    )
    control = RunControl()
    fitted = fit_head(features, head_config, fit_config, control=control)
    fitted.save(out)
    result = readout(fitted, features, args.clusters, seed=args.seed, control=control)
    _save_array(out / "labels.npy", result.labels)
    _save_array(out / "confidence.npy", result.confidence)
    summary = {
        "k_selection": result.k_selection.model_dump(),
        "sizes": np.bincount(result.labels).tolist(),
        "final_loss": fitted.history[-1]["loss"] if fitted.history else None,
    }
    with atomic_output(out / "readout.json") as partial:
        partial.write_text(json.dumps(summary, indent=2))
    print(f"{len(result.labels)} samples in {result.k_selection.k} clusters; wrote {out}")
    return 0
