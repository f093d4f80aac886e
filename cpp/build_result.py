"""Building a run's :class:`~cpp.result.ClusterResult` and writing it as a clustering (:mod:`cpp.clustering`).

:func:`write_run` takes what the stages of :func:`cpp.pipeline.run_cluster` produced (a :class:`FinishedRun`)
and writes ``result.json``, the per-image assignments (inline, or ``assignments.jsonl`` above
``FinishedRun.inline_max`` images) and the clustering artifact's manifest and readout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cpp import clustering
from cpp.encoders import Encoder
from cpp.head_model import FittedHead
from cpp.metrics import evaluate
from cpp.naming import Naming, NamingConfig
from cpp.options import ClusterOptions, SourceSpec
from cpp.readout import Readout
from cpp.result import (
    Assignment,
    Cluster,
    ClusterResult,
    Counts,
    NameScore,
    PartitionChoice,
    RunInfo,
    SkippedFile,
)
from cpp.sources import resolved_spec
from cpp.store import FeatureStore
from cpp.vocab import SIMPLE_TEMPLATES, Vocabulary

#: Members below this quantile of their own-subspace energy mark the novelty threshold (cpp.clustering).
NOVELTY_QUANTILE = 0.05


@dataclass(frozen=True)
class RowColumns:
    """The store's embedded rows as columns, in row order: its index read once."""

    keys: list[str]
    paths: list[str | None]
    labels: list[str | None]
    captions: list[tuple[str, ...]]

    @classmethod
    def read(cls, store: FeatureStore) -> RowColumns:
        columns = cls([], [], [], [])
        for row in store.iter_rows():
            columns.keys.append(row.key)
            columns.paths.append(row.path)
            columns.labels.append(row.label)
            columns.captions.append(row.captions)
        return columns

    def shown(self, row: int) -> str:
        """How row ``row`` is shown: its path, else its key."""
        return self.paths[row] or self.keys[row]


@dataclass
class FinishedRun:
    """Everything a result is built from (the outputs of the stages of :func:`cpp.pipeline.run_cluster`)."""

    work_dir: Path
    source: SourceSpec
    options: ClusterOptions
    encoder: Encoder
    store: FeatureStore
    rows: RowColumns
    head_info: dict[str, Any]
    fit_info: dict[str, Any]
    device: str
    found: Readout
    partition: PartitionChoice
    used: FittedHead | None  # the head whose Z the partition lives in (None: the encoder features)
    vocabulary: Vocabulary
    naming_config: NamingConfig
    naming: Naming
    timings: dict[str, float]
    started: float  # time.perf_counter() at the start of the run
    inline_max: int  # above this many images, assignments go to assignments.jsonl


def _true_labels(labels: Sequence[str | None]) -> np.ndarray | None:
    """Integer ground truth of the rows (-1 where unlabelled, classes numbered by first appearance), or
    None when no row has a label."""
    index: dict[str, int] = {}
    truth = np.array(
        [-1 if label is None else index.setdefault(label, len(index)) for label in labels], dtype=np.int64
    )
    return truth if index else None


def _metrics(labels: Sequence[str | None], predicted: np.ndarray) -> dict[str, float] | None:
    y = _true_labels(labels)
    if y is None:
        return None
    labelled = y >= 0
    metrics = evaluate(y[labelled], predicted[labelled])
    metrics["labelled"] = float(labelled.sum())
    return metrics


def _assignment_dicts(run: FinishedRun) -> Iterator[dict[str, Any]]:
    """One JSON-ready :class:`Assignment` per row, generated lazily (large results are streamed to disk)."""
    rows, found, naming = run.rows, run.found, run.naming
    labels = found.labels.tolist()
    confidence = np.round(found.confidence.astype(np.float64), 5).tolist()
    label_names = [run.vocabulary.names[i] for i in naming.image_labels.tolist()]
    scores = np.round(naming.image_scores.astype(np.float64), 5).tolist()
    return (
        {
            "key": key,
            "path": rows.paths[i],
            "cluster": labels[i],
            "confidence": confidence[i],
            "label": label_names[i],
            "label_score": scores[i],
            "true_label": rows.labels[i],
        }
        for i, key in enumerate(rows.keys)
    )


def _clusters(run: FinishedRun) -> list[Cluster]:
    found = run.found
    sizes = np.bincount(found.labels, minlength=len(found.centers))
    return [
        Cluster(
            id=j,
            size=int(sizes[j]),
            name=named.name,
            score=round(named.score, 5),
            uncertain=named.uncertain,
            alternatives=[NameScore(name=a, score=round(s, 5)) for a, s in named.alternatives],
            representatives=[run.rows.shown(i) for i in found.representatives[j].tolist()],
        )
        for j, named in enumerate(run.naming.clusters)
    ]


def _run_info(run: FinishedRun, timings: dict[str, float]) -> RunInfo:
    store = run.store
    return RunInfo(
        encoder=run.encoder.describe(),
        head=run.head_info,
        fit=run.fit_info,
        k_selection=run.found.k_selection,
        partition=run.partition,
        naming={
            "vocabularies": list(run.options.vocabulary),
            "names": len(run.vocabulary),
            "names_by_origin": run.vocabulary.sources(),
            "templates": list(SIMPLE_TEMPLATES),
            **run.naming_config.model_dump(),
        },
        source=resolved_spec(run.source),
        timings_s={name: round(value, 3) for name, value in timings.items()},
        counts=Counts(items=store.counts["items"], embedded=len(store), skipped=store.counts["skipped"]),
        skipped=[SkippedFile(key=s.key, path=s.path, reason=s.reason) for s in store.skipped()],
        device=run.device,
        seed=run.options.seed,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        work_dir=str(run.work_dir.resolve()),
    )


def write_run(run: FinishedRun) -> ClusterResult:
    """Build the result of ``run`` and write it, its assignments and the clustering artifact to its work
    directory; returns the result."""
    n = len(run.store)
    assignments = _assignment_dicts(run)
    inline = n <= run.inline_max
    if not inline:
        clustering.write_assignments(run.work_dir, assignments, n)
    timings = {**run.timings, "total": time.perf_counter() - run.started}
    result = ClusterResult(
        run=_run_info(run, timings),
        clusters=_clusters(run),
        assignments=[Assignment.model_validate(a) for a in assignments] if inline else None,
        assignments_file=None if inline else clustering.ASSIGNMENTS_FILE,
        metrics=_metrics(run.rows.labels, run.found.labels),
    )
    found, used = run.found, run.used
    clustering.create(
        run.work_dir,
        manifest=clustering.Manifest(
            id=clustering.new_id(),
            created_at=result.run.created_at,
            model=run.options.model,
            encoder=result.run.encoder,
            options=run.options.model_dump(mode="json"),
            source=result.run.source,
            space="raw" if used is None else "head",
            head=None if used is None else clustering.HEAD_DIR,
            novelty=clustering.calibrate_novelty(found.fit, NOVELTY_QUANTILE),
            members=n,
        ),
        readout=clustering.ReadoutModel(
            centers=found.centers,
            bases=found.bases,
            labels=found.labels,
            confidence=found.confidence,
            fit=found.fit,
        ),
        result=result,
    )
    return result
