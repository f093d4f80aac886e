"""Clustering quality benchmark: k-means on raw features vs the MLP and CRATE heads; prints JSON.

    python scripts/bench_quality.py /path/to/image_folder --model effnet-lite0-in1k --cache /tmp/store
    python scripts/bench_quality.py features_X.npy [--labels features_y.npy]

An image folder (one sub-folder per class) is embedded into a cached feature store; a ``*_X.npy`` file is
read with its labels (``--labels``, default: the same name with ``_y``). For every method: ACC/NMI/ARI with
K fixed at the true number of classes, the K that ``auto`` chooses with ACC/NMI/ARI at that K, and fit time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpp.fit import FitConfig, fit_head
from cpp.heads import HeadConfig
from cpp.metrics import evaluate
from cpp.readout import kmeans_baseline, readout


def load_folder(folder: Path, model: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    from cpp.embed import embed_source
    from cpp.encoders import create_encoder
    from cpp.options import SourceSpec

    encoder = create_encoder(model, device="cpu")
    store = embed_source(
        SourceSpec(type="folder", path=str(folder), labels_from_folders=True), cache, encoder
    )
    names = [row.label for row in store.rows()]
    if any(name is None for name in names):
        raise SystemExit(f"{folder}: every image needs a class sub-folder for the benchmark")
    classes = sorted({str(n) for n in names})
    return store.features(), np.array([classes.index(str(n)) for n in names])


def load_npy(path: Path, labels: Path | None) -> tuple[np.ndarray, np.ndarray]:
    labels = labels or path.with_name(path.name.replace("_X", "_y"))
    return np.load(path).astype(np.float32), np.load(labels)


def bench_head(
    x: np.ndarray, y: np.ndarray, k_true: int, head: HeadConfig, fit: FitConfig, seed: int
) -> dict[str, Any]:
    started = time.perf_counter()
    fitted = fit_head(x, head, fit.model_copy(update={"seed": seed}))
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    fixed = readout(fitted, x, k_true, seed=seed)
    readout_s = time.perf_counter() - started
    auto = readout(fitted, x, "auto", seed=seed)
    return {
        "head": head.model_dump(),
        "epochs": fitted.fit_config.epochs,
        "fit_s": round(fit_s, 1),
        "readout_s": round(readout_s, 1),
        "fixed_k": evaluate(y, fixed.labels),
        "auto_k": auto.k_selection.k,
        "auto": evaluate(y, auto.labels),
        "coding_length": dict(
            zip(auto.k_selection.candidates, [round(v) for v in auto.k_selection.coding_length], strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, help="image folder or *_X.npy features")
    parser.add_argument("--labels", type=Path, default=None, help="labels .npy for a features file")
    parser.add_argument("--model", default="effnet-lite0-in1k")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cpp-bench-store"), help="feature store dir")
    parser.add_argument("--epochs", type=int, default=None, help="override the automatic epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="kmeans,mlp,crate0,crate10", help="comma-separated subset")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    if args.data.is_dir():
        x, y = load_folder(args.data, args.model, args.cache)
    else:
        x, y = load_npy(args.data, args.labels)
    k_true = len(np.unique(y))
    fit = FitConfig(epochs=args.epochs, device="cpu")
    report: dict[str, Any] = {
        "data": str(args.data),
        "n": len(x),
        "dim": int(x.shape[1]),
        "classes": k_true,
        "machine": f"{platform.machine()} {os.cpu_count()} CPU, torch {torch.__version__}, no GPU",
        "fit": fit.model_dump(),
        "results": {},
    }
    methods = args.methods.split(",")
    if "kmeans" in methods:
        started = time.perf_counter()
        labels = kmeans_baseline(x, k_true, seed=args.seed)
        report["results"]["kmeans"] = {
            "fixed_k": evaluate(y, labels),
            "fit_s": round(time.perf_counter() - started, 1),
        }
    heads = {
        "mlp": HeadConfig(type="mlp"),
        "crate0": HeadConfig(type="crate", context_k=0),
        "crate10": HeadConfig(type="crate", context_k=10),
    }
    for name, head in heads.items():
        if name in methods:
            report["results"][name] = bench_head(x, y, k_true, head, fit, args.seed)
            print(json.dumps({name: report["results"][name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
