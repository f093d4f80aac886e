"""The whole job: embed (cached) → fit the head → read out clusters → name them → :class:`ClusterResult`.

Everything lands in a work directory: ``features/`` (the resumable feature store), ``head/`` (the fitted head,
reused when the features and settings are unchanged), ``labels/`` (label-embedding cache), ``result.json``
and, for large collections, ``assignments.jsonl`` (one :class:`Assignment` per line) with a row-offset index
``assignments.idx.npy`` so pages can be read without scanning the file.

Small collections: a fixed K must leave at least two images per cluster. Below ``SMALL_N`` images no head
is trained: a few hundred points cannot fit a head whose Z has more dimensions than there are images, and the
coding-length choice of K then always prefers the fewest clusters. Such collections are clustered directly in
the encoder's feature space by spherical k-means, with K (2 .. N/2) chosen by the silhouette. Above it, the
head's context neighbours are capped at N/4.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cpp import clustering
from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.engines import EmbedEngine
from cpp.errors import CppError
from cpp.head_model import FitConfig, FittedHead
from cpp.heads import HeadConfig
from cpp.labels import check_supported, embed_vocabulary
from cpp.logging import get_logger
from cpp.metrics import evaluate
from cpp.naming import NamingConfig, name_clusters
from cpp.options import CAPTIONS, ClusterOptions, SourceSpec
from cpp.progress import RunControl
from cpp.readout import (
    CHOICE_DIMS,
    SELECTION_EPS2,
    Readout,
    direct_readout,
    feature_coding_length,
    feature_readout,
    readout,
)
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
from cpp.sources import Roots, resolved_spec
from cpp.store import LABEL_FIELDS, FeatureStore, RowRecord
from cpp.train import fit_head
from cpp.vocab import SIMPLE_TEMPLATES, captions_vocabulary, resolve_vocabulary

log = get_logger("pipeline")

RESULT_FILE = clustering.RESULT_FILE
ASSIGNMENTS_FILE = clustering.ASSIGNMENTS_FILE
FEATURES_DIR = clustering.FEATURES_DIR
HEAD_DIR = clustering.HEAD_DIR
LABELS_DIR = "labels"
HEAD_KEY_FILE = "key.json"
#: Above this many images, assignments go to ``assignments.jsonl`` instead of ``result.json``.
INLINE_ASSIGNMENTS_MAX = 10_000
MIN_IMAGES = 6
REPRESENTATIVES = 5
#: Members below this quantile of their own-subspace energy mark the novelty threshold (cpp.clustering).
NOVELTY_QUANTILE = 0.05
#: Below this many images the features are clustered directly, without a head (see the module docstring).
SMALL_N = 256


class PipelineError(CppError):
    """The collection or the options cannot be clustered as asked."""


def head_configs(n: int, options: ClusterOptions) -> tuple[HeadConfig, FitConfig]:
    """Head and training settings for ``n`` images: defaults, with context neighbours capped at ``n // 4``."""
    default = HeadConfig(type=options.head)
    head = default.model_copy(update={"context_k": min(default.context_k, n // 4)})
    fit = FitConfig(epochs=options.epochs, seed=options.seed, device=options.device)
    return head, fit


#: Store metadata that labels and captions change (relabelling a store keeps its features and their rows).
_LABEL_META = ("identity", "source", "chunks", "relabelled")


def _head_key(store: FeatureStore, head: HeadConfig, fit: FitConfig) -> dict[str, Any]:
    """What a saved head must match to be reused: the store's features (its metadata, unique per run, less
    what relabelling changes, and its chunk files) and the settings."""
    features = {
        "meta": {k: v for k, v in store.meta.items() if k not in _LABEL_META},
        "chunks": [(chunk["features"], chunk["rows"]) for chunk in store.meta["chunks"]],
    }
    return {
        "store": hashlib.sha256(json.dumps(features, sort_keys=True, default=str).encode()).hexdigest(),
        "head": head.model_dump(),
        "fit": fit.model_dump(),
    }


def _fit_or_reuse(
    store: FeatureStore,
    head: HeadConfig,
    fit: FitConfig,
    directory: Path,
    control: RunControl,
) -> FittedHead:
    """Load the head saved in ``directory`` for the same features and settings, or train and save one."""
    key = _head_key(store, head, fit)
    key_file = directory / HEAD_KEY_FILE
    if key_file.is_file() and json.loads(key_file.read_text()) == key:
        log.info("reusing the fitted head in %s", directory)
        control.stage("fit", 1).advance()
        return FittedHead.load(directory, device=fit.device)
    fitted = fit_head(store, head, fit, control=control)
    fitted.save(directory)
    key_file.write_text(json.dumps(key))
    return fitted


def _choose_partition(
    store: FeatureStore, fitted: FittedHead, options: ClusterOptions, control: RunControl
) -> tuple[Readout, PartitionChoice]:
    """The head's partition or spectral clustering of the encoder features at the same K, whichever codes
    the encoder features in fewer bits (:func:`cpp.readout.feature_coding_length`)."""
    by_head = readout(
        fitted, store, options.clusters, seed=options.seed, control=control, representatives=REPRESENTATIVES
    )
    by_features = feature_readout(
        store, by_head.k_selection.k, seed=options.seed, control=control, representatives=REPRESENTATIVES
    )
    lengths = {
        name: round(feature_coding_length(store, found.labels, seed=options.seed), 1)
        for name, found in (("head", by_head), ("features", by_features))
    }
    method: Literal["head", "features"] = "head" if lengths["head"] <= lengths["features"] else "features"
    log.info("partition by %s (coding length of the features, bits: %s)", method, lengths)
    chosen = by_head if method == "head" else by_features
    chosen.k_selection = by_head.k_selection
    return chosen, PartitionChoice(
        method=method, coding_length=lengths, dims=CHOICE_DIMS, eps2=SELECTION_EPS2
    )


def _display_names(store: FeatureStore, indices: np.ndarray) -> dict[int, str]:
    """Path (or key) of each row in ``indices``, found in one pass over the store's index."""
    wanted = set(indices.tolist())
    return {row.index: row.path or row.key for row in store.iter_rows() if row.index in wanted}


def _true_labels(rows: Iterable[RowRecord]) -> np.ndarray | None:
    """Integer ground truth of the rows (-1 where unlabelled, classes numbered by first appearance), or
    None when no row has a label."""
    index: dict[str, int] = {}
    truth = np.array(
        [-1 if row.label is None else index.setdefault(row.label, len(index)) for row in rows], dtype=np.int64
    )
    return truth if index else None


def _metrics(rows: Iterable[RowRecord], predicted: np.ndarray) -> dict[str, float] | None:
    y = _true_labels(rows)
    if y is None:
        return None
    labelled = y >= 0
    metrics = evaluate(y[labelled], predicted[labelled])
    metrics["labelled"] = float(labelled.sum())
    return metrics


def _assignment_dicts(
    rows: Iterable[RowRecord],
    result: Readout,
    names: Sequence[str],
    image_labels: np.ndarray,
    image_scores: np.ndarray,
) -> Iterator[dict[str, Any]]:
    """One JSON-ready :class:`Assignment` per row, generated lazily (large results are streamed to disk)."""
    labels = result.labels.tolist()
    confidence = np.round(result.confidence.astype(np.float64), 5).tolist()
    label_names = [names[i] for i in image_labels.tolist()]
    scores = np.round(image_scores.astype(np.float64), 5).tolist()
    return (
        {
            "key": row.key,
            "path": row.path,
            "cluster": labels[i],
            "confidence": confidence[i],
            "label": label_names[i],
            "label_score": scores[i],
            "true_label": row.label,
        }
        for i, row in enumerate(rows)
    )


def _check_vocabulary_early(encoder: Encoder, specs: Sequence[str], cache_dir: Path, roots: Roots) -> None:
    """Fail before embedding when a vocabulary file is missing or the encoder cannot embed the names."""
    fixed = [spec for spec in specs if spec != CAPTIONS]
    if CAPTIONS in specs:
        check_supported(encoder, captions_vocabulary(["a caption"]))
    if fixed:
        vocabulary = resolve_vocabulary(fixed, roots=roots)
        if not encoder.has_text_tower:  # classifier rows: instant, and raises for names it does not know
            embed_vocabulary(encoder, vocabulary, templates=SIMPLE_TEMPLATES, cache_dir=cache_dir)


def run_cluster(
    source: SourceSpec,
    options: ClusterOptions,
    work_dir: str | Path,
    *,
    control: RunControl | None = None,
    encoder: Encoder | None = None,
    engine: EmbedEngine | None = None,
    roots: Roots = None,
) -> ClusterResult:
    """Cluster and name the images of ``source``; writes ``work_dir/result.json`` and returns the result.

    Resumable: the feature store in ``work_dir/features`` and the fitted head are reused when they match.
    Progress stages: ``embed``, ``fit``, ``readout`` and ``name``; :class:`~cpp.progress.Cancelled` is raised
    between batches after ``control.cancel()``. ``encoder`` and ``engine`` override the ones ``options``
    imply (default engine: local). With ``roots``, every file read (images, lists, annotations, vocabulary
    files) must resolve inside them (:mod:`cpp.sources`).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    control = control or RunControl()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if encoder is None:
        try:
            encoder = create_encoder(options.model, device=options.device)
        except ValueError as exc:  # unknown spec or bad argument
            raise PipelineError(f"model {options.model!r}: {exc}") from exc
    _check_vocabulary_early(encoder, options.vocabulary, work_dir / LABELS_DIR, roots)
    store = embed_source(
        source,
        work_dir / FEATURES_DIR,
        encoder,
        batch_size=options.batch_size,
        engine=engine,
        control=control,
        roots=roots,
    )
    n = len(store)
    timings["embed"] = time.perf_counter() - started
    if n < MIN_IMAGES:
        raise PipelineError(
            f"only {n} usable images in {source.path} ({len(store.skipped())} skipped); "
            f"clustering needs at least {MIN_IMAGES}"
        )
    if isinstance(options.clusters, int) and options.clusters > n // 2:
        raise PipelineError(
            f"{options.clusters} clusters need at least {2 * options.clusters} images (two per cluster); "
            f"{source.path} has {n}. Ask for at most {n // 2} clusters, or 'auto'."
        )
    vocabulary = resolve_vocabulary(
        options.vocabulary,
        captions=(caption for row in store.iter_rows() for caption in row.captions),
        roots=roots,
    )

    tick = time.perf_counter()
    fitted: FittedHead | None = None
    if n < SMALL_N:
        log.info("%d images (< %d): clustering the features directly, without training a head", n, SMALL_N)
        head_info: dict[str, Any] = {
            "type": "none",
            "reason": f"fewer than {SMALL_N} images: spherical k-means on the encoder features, "
            "K by silhouette",
        }
        control.stage("fit", 1).advance()
    else:
        head_config, fit_config = head_configs(n, options)
        fitted = _fit_or_reuse(store, head_config, fit_config, work_dir / HEAD_DIR, control)
        head_info = head_config.model_dump()
    timings["fit"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if fitted is None:
        stage = control.stage("readout", 1)
        found = direct_readout(
            store.features(), options.clusters, seed=options.seed, representatives=REPRESENTATIVES
        )
        stage.advance()
        partition = PartitionChoice(method="direct")
    else:
        found, partition = _choose_partition(store, fitted, options, control)
    # The head whose Z the chosen partition lives in (None: the encoder features).
    used = fitted if partition.method == "head" else None
    timings["readout"] = time.perf_counter() - tick

    tick = time.perf_counter()
    naming_config = NamingConfig(seed=options.seed)
    if used is None:
        naming_config = naming_config.model_copy(update={"space": "raw"})
    stage = control.stage("name", len(vocabulary) + 2)
    label_vectors = embed_vocabulary(
        encoder, vocabulary, templates=SIMPLE_TEMPLATES, cache_dir=work_dir / LABELS_DIR, stage=stage
    )
    naming = name_clusters(
        store,
        found.labels,
        label_vectors,
        vocabulary,
        naming_config,
        fitted=used,
        z=found.z,
        stage=stage,
    )
    timings["name"] = time.perf_counter() - tick

    sizes = np.bincount(found.labels, minlength=len(found.centers))
    shown = _display_names(store, np.concatenate(found.representatives))
    clusters = [
        Cluster(
            id=j,
            size=int(sizes[j]),
            name=named.name,
            score=round(named.score, 5),
            uncertain=named.uncertain,
            alternatives=[NameScore(name=a, score=round(s, 5)) for a, s in named.alternatives],
            representatives=[shown[i] for i in found.representatives[j].tolist()],
        )
        for j, named in enumerate(naming.clusters)
    ]
    assignments = _assignment_dicts(
        store.iter_rows(), found, vocabulary.names, naming.image_labels, naming.image_scores
    )
    inline = n <= INLINE_ASSIGNMENTS_MAX
    if not inline:
        clustering.write_assignments(work_dir, assignments, n)
    timings["total"] = time.perf_counter() - started

    fit_info: dict[str, Any] = {}
    if fitted is not None:
        fit_info = {
            **fitted.fit_config.model_dump(),
            "trained_on": min(n, fitted.fit_config.max_train_samples),
            "final": fitted.history[-1] if fitted.history else {},
        }
    result = ClusterResult(
        run=RunInfo(
            encoder=encoder.describe(),
            head=head_info,
            fit=fit_info,
            k_selection=found.k_selection,
            partition=partition,
            naming={
                "vocabularies": list(options.vocabulary),
                "names": len(vocabulary),
                "names_by_origin": vocabulary.sources(),
                "templates": list(SIMPLE_TEMPLATES),
                **naming_config.model_dump(),
            },
            source=resolved_spec(source),
            timings_s={name: round(value, 3) for name, value in timings.items()},
            counts=Counts(items=store.counts["items"], embedded=n, skipped=store.counts["skipped"]),
            skipped=[SkippedFile(key=s.key, path=s.path, reason=s.reason) for s in store.skipped()],
            device=str(fitted.device if fitted is not None else encoder.device),
            seed=options.seed,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            work_dir=str(work_dir.resolve()),
        ),
        clusters=clusters,
        assignments=[Assignment.model_validate(a) for a in assignments] if inline else None,
        assignments_file=None if inline else ASSIGNMENTS_FILE,
        metrics=_metrics(store.iter_rows(), found.labels),
    )
    clustering.create(
        work_dir,
        manifest=clustering.Manifest(
            id=clustering.new_id(),
            created_at=result.run.created_at,
            model=options.model,
            encoder=result.run.encoder,
            options=options.model_dump(mode="json"),
            source=result.run.source,
            space="raw" if used is None else "head",
            head=None if used is None else HEAD_DIR,
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


def load_result(work_dir: str | Path) -> ClusterResult:
    """The result written by :func:`run_cluster` in ``work_dir``."""
    path = Path(work_dir) / RESULT_FILE
    if not path.is_file():
        raise PipelineError(
            f"{path} does not exist: run `cpp cluster` (run_cluster) with this work directory"
        )
    return ClusterResult.model_validate_json(path.read_text(encoding="utf-8"))


def read_assignments(
    work_dir: str | Path, *, offset: int = 0, limit: int = 100
) -> tuple[list[Assignment], int]:
    """One page of per-image assignments of the result in ``work_dir``, and the total count."""
    if offset < 0 or limit < 0:
        raise ValueError("offset and limit must be non-negative")
    return clustering.read_assignments(work_dir, load_result(work_dir), offset=offset, limit=limit)


def runs_dir() -> Path:
    """Where default work directories go: ``$CPP_CACHE_DIR/runs``, else ``~/.cache/cpp/runs``."""
    root = os.environ.get("CPP_CACHE_DIR")
    if root:
        return Path(root) / "runs"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpp" / "runs"


def default_work_dir(source: SourceSpec, model: str) -> Path:
    """``runs_dir()/<hash>``: one work directory per source and model."""
    spec = {k: v for k, v in resolved_spec(source).items() if k not in LABEL_FIELDS}  # labels: same features
    key = hashlib.sha256(json.dumps({"source": spec, "model": model}).encode()).hexdigest()
    return runs_dir() / key[:16]
