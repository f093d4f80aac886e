"""Scale check: fit + whole-set readout on N synthetic features from a mixture of low-dimensional subspaces.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
        python scripts/bench_scale.py --n 5000000 --dim 512 --clusters 20 --work-dir /big/disk/dir

The data are generated chunk by chunk (K random ``subspace_dim``-dimensional subspaces of R^dim, Gaussian
coefficients, isotropic noise, a shared offset, rows L2-normalised) straight into a float16 feature store on
disk (``--work-dir``; N x dim x 2 bytes), never whole in memory. The head trains on a random sample read
from the store (``--train``); the readout streams every row from the store. Prints JSON with stage times,
peak RSS (of the fit + readout, and of the whole process) and ACC/NMI/ARI against the generating clusters.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpp.head_model import FitConfig
from cpp.heads import HeadConfig
from cpp.metrics import evaluate
from cpp.readout import readout
from cpp.store import FeatureStore, StoreWriter
from cpp.train import fit_head


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _generate(args: argparse.Namespace, directory: Path) -> None:
    _, labels = write_mixture(
        directory / "features", args.n, args.dim, args.clusters, args.subspace_dim, args.noise, args.seed
    )
    np.save(directory / "labels.npy", labels)


def write_mixture(
    path: Path, n: int, dim: int, k: int, subspace_dim: int, noise: float, seed: int, chunk: int = 65536
) -> tuple[FeatureStore, np.ndarray]:
    """A float16 store of ``(N, dim)`` unit rows and their generating clusters, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    bases = np.linalg.qr(rng.standard_normal((k, dim, subspace_dim)))[0].astype(np.float32)
    offset = (0.3 * rng.standard_normal(dim) / np.sqrt(dim)).astype(np.float32)
    labels = rng.integers(0, k, n)
    identity = {"encoder_id": "synthetic", "encoder_weights": None, "source": {"seed": seed, "n": n}}
    settings = {"chunk_size": chunk, "dtype": "float16", "dim": dim, "max_pixels": 0}
    writer = StoreWriter.open(path, identity, settings)
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        coef = rng.standard_normal((len(lab), subspace_dim), dtype=np.float32) / np.sqrt(subspace_dim)
        part = np.empty((len(lab), dim), dtype=np.float32)
        for j in range(k):  # per cluster: no (rows, dim, subspace_dim) temporary
            members = lab == j
            part[members] = coef[members] @ bases[j].T
        part += noise * rng.standard_normal(part.shape, dtype=np.float32) / np.sqrt(dim) + offset
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        entries: list[dict[str, Any]] = [
            {"key": str(i), "path": None, "captions": [], "label": None, "status": "ok", "reason": None}
            for i in range(start, start + len(lab))
        ]
        writer.write_chunk(part, entries)
    return writer.finish({"encoder_id": "synthetic", "encoder": {}, "source": identity["source"]}), labels


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
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the store goes (kept; reused by a later run)"
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    directory = args.work_dir or Path(tempfile.mkdtemp(prefix="cpp-scale-"))
    directory.mkdir(parents=True, exist_ok=True)

    times: dict[str, float] = {}
    started = time.perf_counter()
    if not FeatureStore.exists(directory / "features"):
        # In a child process, so that this process's peak RSS is that of fit + readout alone.
        child = multiprocessing.get_context("fork").Process(target=_generate, args=(args, directory))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"generating the features failed (exit code {child.exitcode})")
    times["generate_s"] = time.perf_counter() - started
    x = FeatureStore.open(directory / "features")
    y = np.load(directory / "labels.npy")
    if len(x) != args.n or x.dim != args.dim:
        raise SystemExit(f"{directory} holds {len(x)} x {x.dim} features, not {args.n} x {args.dim}")

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
        "generator_peak_rss_gib": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 2),
        "store": {"path": str(directory / "features"), "dtype": "float16", "chunk_rows": 65536},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
