"""Scale check: fit + whole-set readout on N synthetic features from a mixture of low-dimensional subspaces.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
        python scripts/bench_scale.py --n 1000000 --dim 512 --clusters 20

The data are generated in chunks (K random ``subspace_dim``-dimensional subspaces of R^dim, Gaussian
coefficients, isotropic noise, a shared offset, rows L2-normalised). The head trains on a random subset
(``--train``); the readout covers all N in chunks. Prints JSON with stage times, peak RSS and ACC/NMI/ARI
against the generating clusters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any

import numpy as np
import torch

from cpp.fit import FitConfig, fit_head
from cpp.heads import HeadConfig
from cpp.metrics import evaluate
from cpp.readout import readout


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def subspace_mixture(
    n: int, dim: int, k: int, subspace_dim: int, noise: float, seed: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, dim)`` float32 unit rows and their generating cluster, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    bases = np.linalg.qr(rng.standard_normal((k, dim, subspace_dim)))[0].astype(np.float32)
    offset = (0.3 * rng.standard_normal(dim) / np.sqrt(dim)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        coef = rng.standard_normal((len(lab), subspace_dim), dtype=np.float32) / np.sqrt(subspace_dim)
        part = np.einsum("ndr,nr->nd", bases[lab], coef)
        part += noise * rng.standard_normal(part.shape, dtype=np.float32) / np.sqrt(dim) + offset
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        x[start : start + len(lab)] = part
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=20, help="generating subspaces (K given to readout)")
    parser.add_argument("--subspace-dim", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--train", type=int, default=20_000, help="training subset size")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--context-k", type=int, default=HeadConfig().context_k)
    parser.add_argument("--auto", action="store_true", help="also choose K by coding length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    times: dict[str, float] = {}
    started = time.perf_counter()
    x, y = subspace_mixture(args.n, args.dim, args.clusters, args.subspace_dim, args.noise, args.seed)
    times["generate_s"] = time.perf_counter() - started

    head = HeadConfig(context_k=args.context_k)
    fit = FitConfig(epochs=args.epochs, max_train_samples=args.train, seed=args.seed, device="cpu")
    started = time.perf_counter()
    fitted = fit_head(x, head, fit)
    times["fit_s"] = time.perf_counter() - started

    started = time.perf_counter()
    out = readout(fitted, x, "auto" if args.auto else args.clusters, seed=args.seed)
    times["readout_s"] = time.perf_counter() - started
    report: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "subspace_dim": args.subspace_dim,
        "noise": args.noise,
        "head": head.model_dump(),
        "fit": fitted.fit_config.model_dump(),
        "k": out.k_selection.k,
        "metrics": evaluate(y, out.labels),
        "times_s": {name: round(value, 1) for name, value in times.items()},
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
