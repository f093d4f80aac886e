"""Same features, head settings and seed give the same partition: twice in one process, in concurrent
threads (service jobs) and in a fresh process with the same thread counts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from synthetic import subspace_mixture

from cpp.head_model import FitConfig
from cpp.heads import HeadConfig
from cpp.readout import direct_readout, readout
from cpp.train import fit_head

HEAD = HeadConfig(width=32, layers=1, heads=4, z_dim=16, context_k=5)
FIT = FitConfig(epochs=4, batch_size=128, cluster_rows=32, device="cpu")


def noisy_mixture() -> np.ndarray:
    """Overlapping subspaces, so that a different head or k-means start moves some points."""
    x, _ = subspace_mixture(300, 24, 5, 3, seed=7)
    return x + 0.3 * np.random.default_rng(8).standard_normal(x.shape).astype(np.float32)


def partitions(x: np.ndarray) -> dict[str, Any]:
    """Seed-0 labels of the head path (fit, auto-K readout) and of the small path (direct readout), with
    digests of the head path's Z and of the direct path's centres."""
    found = readout(fit_head(x, HEAD, FIT), x, "auto")
    direct = direct_readout(x, "auto")
    assert found.z is not None
    return {
        "head": found.labels.tolist(),
        "z": hashlib.sha256(found.z.tobytes()).hexdigest(),
        "direct": direct.labels.tolist(),
        "centers": hashlib.sha256(direct.centers.tobytes()).hexdigest(),
    }


def test_two_runs_in_one_process_and_in_threads_agree() -> None:
    x = noisy_mixture()
    first = partitions(x)
    assert len(set(first["head"])) > 1 and len(set(first["direct"])) > 1
    assert partitions(x) == first
    with ThreadPoolExecutor(2) as pool:  # two service jobs at once
        assert list(pool.map(partitions, [x, x])) == [first, first]


def test_a_fresh_process_with_the_same_threads_agrees(tmp_path: Path) -> None:
    x = noisy_mixture()
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, faiss, numpy, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"faiss.omp_set_num_threads({faiss.omp_get_max_threads()})\n"
        "from test_reproducibility import partitions\n"
        f"print(json.dumps(partitions(numpy.load({str(tmp_path / 'x.npy')!r}))))\n"
    )
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.splitlines()[-1]) == partitions(x)
