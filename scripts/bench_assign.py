"""Assigning new images to a clustering (issue 14): held-out accuracy, novelty, throughput.

    python scripts/bench_assign.py DATASET [--features STORE] [--seed 0] [--work DIR] [--json FILE]

DATASET is an image folder with one sub-folder per class (folder names: ground truth, used only to score).
Protocol: with ``--seed``, 80 % of the classes are *seen*; 70 % of each seen class's images are clustered
(``run_cluster`` with K = the number of seen classes and default options otherwise), the other 30 % are
*held out*; every image of the other 20 % of classes is *unseen*. Held-out and unseen images are then
assigned (``cpp.assign.assign``) as one new source. Reported:

- ``fitted_acc``: ACC of the clustered part under its best cluster-to-class matching (Hungarian);
- ``heldout_acc``: ACC of the held-out images of seen classes under that same matching (target: within 2
  points of ``fitted_acc``);
- ``novel_unseen`` / ``novel_seen``: shares of unseen-class and held-out seen-class images flagged novel at
  the calibrated threshold (target: >= 50 % while <= 10 %), and ``novelty_auroc`` of the novelty score
  (unseen = positive, lower score = more novel), beside the AUROC of the head's own subspace energy;
- ``members_rule_agreement``: the share of the clustering's members that the nearest-subspace rule alone
  (member look-up off) files under their own cluster;
- throughput: ``--throughput-images`` new images (a seeded subset) embedded by ``cpp.embed.embed_source``
  (what ``cpp embed`` runs) and assigned by ``assign`` into fresh directories, alternately, twice each;
  images per second of the medians and their ratio (target: assign >= 0.9x embed).

Features: with ``--features STORE`` (a complete store of DATASET by the same encoder, e.g. the cache of
scripts/bench_quality.py), the clustered and the new images' stores are written from its rows instead of
embedding them again: the same encoder's features of the same files, as ``cpp embed`` of the two file lists
would store them. Without it the dataset is embedded once into ``WORK/features``. The throughput runs always
embed from the image files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from cpp import assign as assign_module
from cpp import clustering
from cpp.assign import assign, iter_results
from cpp.embed import embed_source, store_identity
from cpp.encoders import Encoder, create_encoder
from cpp.options import AssignOptions, ClusterOptions, SourceSpec
from cpp.pipeline import run_cluster
from cpp.sources import SourceItems
from cpp.store import FeatureStore, StoreWriter

SEEN_SHARE = 0.8
FIT_SHARE = 0.7
ACC_TARGET = 0.02
NOVEL_UNSEEN_TARGET = 0.5
NOVEL_SEEN_TARGET = 0.10
THROUGHPUT_TARGET = 0.9


def split(labels: list[str], seed: int) -> tuple[list[int], list[int], list[int], list[str]]:
    """Row indices of the clustered, held-out and unseen images, and the seen classes."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    seen = sorted(rng.permutation(classes)[: round(SEEN_SHARE * len(classes))].tolist())
    fit: list[int] = []
    held: list[int] = []
    unseen: list[int] = []
    for name in classes:
        rows = rng.permutation([i for i, label in enumerate(labels) if label == name]).tolist()
        if name in seen:
            cut = round(FIT_SHARE * len(rows))
            fit += rows[:cut]
            held += rows[cut:]
        else:
            unseen += rows
    return sorted(fit), sorted(held), sorted(unseen), seen


def write_list(path: Path, paths: list[str], labels: list[str]) -> SourceSpec:
    """A CSV file list (path, label) and its source."""
    with path.open("w", encoding="utf-8") as out:
        out.write("path,label\n")
        for file, label in zip(paths, labels, strict=True):
            out.write(f"{file},{label}\n")
    return SourceSpec(type="files", path=str(path))


def seed_store(
    out: Path, spec: SourceSpec, encoder: Encoder, cached: FeatureStore, row_of: dict[str, int]
) -> None:
    """Write the store that embedding ``spec`` would write, from ``cached`` rows of the same files."""
    if FeatureStore.exists(out):
        return
    items = SourceItems.of(spec)
    settings = {
        "chunk_size": cached.meta["chunk_size"],
        "dtype": cached.meta["dtype"],
        "dim": cached.dim,
        "max_pixels": cached.meta.get("settings", {}).get("max_pixels", 64_000_000),
    }
    writer = StoreWriter.open(out, store_identity(spec, encoder), settings)
    size = int(settings["chunk_size"])
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        features = cached.take(np.array([row_of[str(item.path)] for item in chunk]))
        entries = [
            {
                "item": start + j,
                "key": item.key,
                "path": item.path,
                "captions": list(item.captions),
                "label": item.label,
                "status": "ok",
                "reason": None,
            }
            for j, item in enumerate(chunk)
        ]
        writer.write_chunk(features, entries)
    writer.finish(
        {
            "encoder_id": encoder.id,
            "encoder": encoder.describe(),
            "source": spec.model_dump(),
        }
    )


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the ``positive`` rows (ties counted half)."""
    ranks = rankdata(score)
    n1 = int(positive.sum())
    n0 = len(score) - n1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def matching(predicted: np.ndarray, truth: list[str]) -> dict[int, str]:
    """The best one-to-one map of clusters to classes (Hungarian on the contingency table)."""
    classes = sorted(set(truth))
    index = {name: i for i, name in enumerate(classes)}
    k = int(predicted.max()) + 1
    table = np.zeros((k, len(classes)), dtype=np.int64)
    np.add.at(table, (predicted, np.array([index[t] for t in truth])), 1)
    rows, cols = linear_sum_assignment(-table)
    return {int(r): classes[c] for r, c in zip(rows, cols, strict=True)}


def throughput(
    found: clustering.Clustering, spec: SourceSpec, encoder: Encoder, work: Path, batch_size: int
) -> dict[str, Any]:
    """Images per second of embed_source and of assign on the same images, alternately, twice each."""
    for item in SourceItems.of(spec):  # warm the page cache for both
        item.load_bytes()
    runs: dict[str, list[float]] = {"embed": [], "assign": []}
    n = len(SourceItems.of(spec))
    for attempt in range(2):
        for kind in ("embed", "assign"):
            target = work / f"throughput-{kind}-{attempt}"
            shutil.rmtree(target, ignore_errors=True)
            started = time.perf_counter()
            if kind == "embed":
                embed_source(spec, target, encoder, batch_size=batch_size)
            else:
                assign(found, spec, target, encoder=encoder, options=AssignOptions(batch_size=batch_size))
            runs[kind].append(time.perf_counter() - started)
    embed_s, assign_s = float(np.median(runs["embed"])), float(np.median(runs["assign"]))
    return {
        "images": n,
        "seconds": {kind: [round(s, 2) for s in values] for kind, values in runs.items()},
        "embed_images_per_s": round(n / embed_s, 2),
        "assign_images_per_s": round(n / assign_s, 2),
        "ratio": round(embed_s / assign_s, 3),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, help="image folder, one sub-folder per class")
    parser.add_argument("--features", type=Path, default=None, help="a complete feature store of DATA")
    parser.add_argument("--model", default="effnet-lite0-in1k", help="encoder spec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpp-bench-assign"))
    parser.add_argument("--throughput-images", type=int, default=1000, help="0: skip the throughput runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()

    encoder = create_encoder(args.model, device="cpu")
    work = args.work / f"{args.data.parent.name}-{args.data.name}-seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    dataset = SourceSpec(type="folder", path=str(args.data), labels_from_folders=True)
    cached = (
        FeatureStore.open(args.features)
        if args.features
        else embed_source(dataset, work / "features", encoder)
    )
    if cached.encoder_id != encoder.id or cached.source.get("path") != os.path.abspath(args.data):
        raise SystemExit(
            f"{cached.path} holds features of {cached.source.get('path')} by {cached.encoder_id}"
        )
    rows = cached.rows()
    paths = [row.path or row.key for row in rows]
    labels = [str(row.label) for row in rows]
    fit, held, unseen, seen = split(labels, args.seed)
    new = sorted(held + unseen)
    fit_spec = write_list(work / "fit.csv", [paths[i] for i in fit], [labels[i] for i in fit])
    new_spec = write_list(work / "new.csv", [paths[i] for i in new], [labels[i] for i in new])
    row_of = {path: i for i, path in enumerate(paths)}
    seed_store(work / "clustering" / "features", fit_spec, encoder, cached, row_of)
    seed_store(work / "assign" / "features", new_spec, encoder, cached, row_of)

    started = time.perf_counter()
    options = ClusterOptions(model=args.model, clusters=len(seen), seed=args.seed, device="cpu")
    result = run_cluster(fit_spec, options, work / "clustering", encoder=encoder)
    fit_s = time.perf_counter() - started
    found = clustering.open(work / "clustering")
    member_truth = [labels[row_of[a.path or a.key]] for a in found.assignments(limit=len(fit))[0]]
    member_labels = found.labels()
    cluster_class = matching(member_labels, member_truth)
    fitted_acc = float(
        np.mean([cluster_class.get(int(c)) == t for c, t in zip(member_labels, member_truth, strict=True)])
    )

    started = time.perf_counter()
    summary = assign(found, new_spec, work / "assign", encoder=encoder, options=AssignOptions(device="cpu"))
    assign_s = time.perf_counter() - started
    records = list(iter_results(work / "assign"))
    truth = np.array([r.true_label for r in records])
    is_seen = np.isin(truth, seen)
    cluster = np.array([r.cluster for r in records])
    novel = np.array([r.novel for r in records])
    score = np.array([r.score for r in records])
    heldout_acc = float(
        np.mean(
            [cluster_class.get(int(c)) == t for c, t in zip(cluster[is_seen], truth[is_seen], strict=True)]
        )
    )

    scorer = assign_module.Assigner(found, device="cpu")
    store = FeatureStore.open(work / "assign" / "features")
    energy = np.concatenate([scorer.score(block).energy for _, block in store.iter_blocks()])
    assign_module.MEMBER_SIMILARITY = 2.0  # the rule alone: no image counts as a member
    members = FeatureStore.open(work / "clustering" / "features")
    rule = np.concatenate([scorer.score(block).cluster for _, block in members.iter_blocks()])

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted": [
            line[3:] for line in _git("status", "--porcelain").splitlines() if line[3:].startswith("cpp/")
        ],
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
        },
        "dataset": str(args.data),
        "model": args.model,
        "seed": args.seed,
        "features_from": str(cached.path),
        "classes": {"seen": len(seen), "unseen": len(set(labels)) - len(seen)},
        "images": {"clustered": len(fit), "heldout": len(held), "unseen": len(unseen)},
        "clusters": len(result.clusters),
        "fitted_acc": round(fitted_acc, 4),
        "heldout_acc": round(heldout_acc, 4),
        "acc_gap": round(fitted_acc - heldout_acc, 4),
        "novelty": summary.novelty.model_dump(),
        "novel_unseen": round(float(novel[~is_seen].mean()), 4),
        "novel_seen": round(float(novel[is_seen].mean()), 4),
        "novelty_auroc": round(auroc(~is_seen, -score), 4),
        "head_energy_auroc": round(auroc(~is_seen, -energy), 4),
        "members_rule_agreement": round(float((rule == member_labels).mean()), 4),
        "seconds": {"cluster": round(fit_s, 1), "assign_cached_features": round(assign_s, 1)},
    }
    report["targets"] = {
        "heldout_acc_at_most_2_points_below": report["acc_gap"] <= ACC_TARGET,
        "heldout_acc_within_2_points": abs(report["acc_gap"]) <= ACC_TARGET,
        "novel_unseen_ge_50pct": report["novel_unseen"] >= NOVEL_UNSEEN_TARGET,
        "novel_seen_le_10pct": report["novel_seen"] <= NOVEL_SEEN_TARGET,
    }
    if args.throughput_images:
        rng = np.random.default_rng(args.seed)
        subset = np.sort(rng.choice(new, size=min(args.throughput_images, len(new)), replace=False))
        spec = write_list(work / "throughput.csv", [paths[i] for i in subset], [labels[i] for i in subset])
        report["throughput"] = throughput(found, spec, encoder, work, args.batch_size)
        report["targets"]["throughput_ge_0.9x"] = report["throughput"]["ratio"] >= THROUGHPUT_TARGET
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".tmp")
        partial.write_text(text)
        os.replace(partial, args.json)
    print(text)


if __name__ == "__main__":
    main()
