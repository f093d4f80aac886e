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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from cpp import clustering
from cpp.assign import encoder_mismatch
from cpp.build_result import FinishedRun, RowColumns, write_run
from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.engines import EmbedEngine
from cpp.errors import CppError
from cpp.head_model import FitConfig, FittedHead
from cpp.heads import HeadConfig
from cpp.labels import check_supported, embed_vocabulary
from cpp.logging import get_logger
from cpp.naming import Naming, NamingConfig, name_clusters
from cpp.options import CAPTIONS, ClusterOptions, SourceSpec
from cpp.progress import RunControl
from cpp.readout import (
    CHOICE_DIMS,
    SELECTION_EPS2,
    Readout,
    direct_readout,
    feature_coding_lengths,
    feature_readout,
    readout,
)
from cpp.result import Assignment, ClusterResult, PartitionChoice
from cpp.sources import Roots, resolved_spec
from cpp.store import LABEL_FIELDS, META_FILE, FeatureStore
from cpp.train import fit_head
from cpp.vocab import SIMPLE_TEMPLATES, Vocabulary, captions_vocabulary, resolve_vocabulary

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
#: Below this many images the features are clustered directly, without a head (see the module docstring).
SMALL_N = 256


class PipelineError(CppError):
    """The collection or the options cannot be clustered as asked."""


#: A head's architecture and training settings.
HeadSettings = tuple[HeadConfig, FitConfig]


def head_configs(n: int, options: ClusterOptions) -> HeadSettings:
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
    key_file.unlink(missing_ok=True)  # the old key must not vouch for the files being replaced
    fitted.save(directory)
    partial = key_file.with_name(f"{key_file.name}.tmp")
    partial.write_text(json.dumps(key))
    os.replace(partial, key_file)
    return fitted


def _choose_partition(
    store: FeatureStore, fitted: FittedHead, options: ClusterOptions, control: RunControl
) -> tuple[Readout, PartitionChoice]:
    """The head's partition or spectral clustering of the encoder features at the same K, whichever codes
    the encoder features in fewer bits (:func:`cpp.readout.feature_coding_lengths`)."""
    by_head = readout(
        fitted, store, options.clusters, seed=options.seed, control=control, representatives=REPRESENTATIVES
    )
    by_features = feature_readout(
        store, by_head.k_selection.k, seed=options.seed, control=control, representatives=REPRESENTATIVES
    )
    bits = feature_coding_lengths(
        store, {"head": by_head.labels, "features": by_features.labels}, seed=options.seed
    )
    lengths = {name: round(value, 1) for name, value in bits.items()}
    method: Literal["head", "features"] = "head" if lengths["head"] <= lengths["features"] else "features"
    log.info("partition by %s (coding length of the features, bits: %s)", method, lengths)
    chosen = by_head if method == "head" else by_features
    chosen.k_selection = by_head.k_selection
    return chosen, PartitionChoice(
        method=method, coding_length=lengths, dims=CHOICE_DIMS, eps2=SELECTION_EPS2, graph=by_features.graph
    )


def check_vocabulary(encoder: Encoder, specs: Sequence[str], cache_dir: Path, roots: Roots = None) -> None:
    """Fail before embedding when a vocabulary file is missing or the encoder cannot embed the names."""
    fixed = [spec for spec in specs if spec != CAPTIONS]
    if CAPTIONS in specs:
        check_supported(encoder, captions_vocabulary(["a caption"]))
    if fixed:
        vocabulary = resolve_vocabulary(fixed, roots=roots)
        if not encoder.has_text_tower:  # classifier rows: instant, and raises for names it does not know
            embed_vocabulary(encoder, vocabulary, templates=SIMPLE_TEMPLATES, cache_dir=cache_dir)


class Stages:
    """The one place a run's stages are timed; each stage reports its own progress through ``control``."""

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[RunControl]:
        """Time stage ``name`` (the embed stage from the start of the run, encoder loading included)."""
        tick = self.started if name == "embed" else time.perf_counter()
        yield self.control
        self.timings[name] = time.perf_counter() - tick
        log.debug("stage %s: %.3f s", name, self.timings[name])


class Clusterer(Protocol):
    """How a collection is partitioned: fitted once (``fit`` stage), then read out (``readout`` stage)."""

    #: What ``result.run.head`` records.
    head_info: dict[str, Any]

    def fit(self, store: FeatureStore, control: RunControl) -> None: ...

    def partition(
        self, store: FeatureStore, control: RunControl
    ) -> tuple[Readout, PartitionChoice, FittedHead | None]:
        """The readout, how it was chosen, and the head whose Z it lives in (None: the encoder features)."""
        ...

    def fit_info(self, n: int) -> dict[str, Any]:
        """What ``result.run.fit`` records."""
        ...

    def device(self, encoder: Encoder) -> str:
        """Where the clustering ran."""
        ...


class DirectClusterer:
    """Below :data:`SMALL_N` images: spherical k-means on the encoder features, K by silhouette; no head."""

    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.head_info: dict[str, Any] = {
            "type": "none",
            "reason": f"fewer than {SMALL_N} images: spherical k-means on the encoder features, "
            "K by silhouette",
        }

    def fit(self, store: FeatureStore, control: RunControl) -> None:
        log.info(
            "%d images (< %d): clustering the features directly, without training a head", len(store), SMALL_N
        )
        control.stage("fit", 1).advance()

    def partition(
        self, store: FeatureStore, control: RunControl
    ) -> tuple[Readout, PartitionChoice, FittedHead | None]:
        stage = control.stage("readout", 1)
        found = direct_readout(
            store.features(), self.options.clusters, seed=self.options.seed, representatives=REPRESENTATIVES
        )
        stage.advance()
        return found, PartitionChoice(method="direct"), None

    def fit_info(self, n: int) -> dict[str, Any]:
        return {}

    def device(self, encoder: Encoder) -> str:
        return str(encoder.device)


class HeadClusterer:
    """A trained (or reused) head, then its partition or the encoder features' (:func:`_choose_partition`)."""

    def __init__(
        self, n: int, options: ClusterOptions, directory: Path, configs: HeadSettings | None = None
    ) -> None:
        self.options = options
        self.directory = directory
        self.head_config, self.fit_config = configs or head_configs(n, options)
        self.head_info = self.head_config.model_dump()
        self._fitted: FittedHead | None = None

    @property
    def fitted(self) -> FittedHead:
        if self._fitted is None:
            raise RuntimeError("HeadClusterer.fit must run before the head is used")
        return self._fitted

    def fit(self, store: FeatureStore, control: RunControl) -> None:
        self._fitted = _fit_or_reuse(store, self.head_config, self.fit_config, self.directory, control)

    def partition(
        self, store: FeatureStore, control: RunControl
    ) -> tuple[Readout, PartitionChoice, FittedHead | None]:
        found, partition = _choose_partition(store, self.fitted, self.options, control)
        return found, partition, self.fitted if partition.method == "head" else None

    def fit_info(self, n: int) -> dict[str, Any]:
        fitted = self.fitted
        return {
            **fitted.fit_config.model_dump(),
            "trained_on": min(n, fitted.fit_config.max_train_samples),
            "final": fitted.history[-1] if fitted.history else {},
        }

    def device(self, encoder: Encoder) -> str:
        return str(self.fitted.device)


def choose_clusterer(
    n: int, options: ClusterOptions, head_dir: Path, configs: HeadSettings | None = None
) -> Clusterer:
    """Direct clustering below :data:`SMALL_N` images, else a head saved in (or reused from) ``head_dir``
    with ``configs`` (default: :func:`head_configs`)."""
    return DirectClusterer(options) if n < SMALL_N else HeadClusterer(n, options, head_dir, configs)


def _check_size(source: SourceSpec, store: FeatureStore, options: ClusterOptions) -> None:
    n = len(store)
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


def name_partition(
    store: FeatureStore,
    found: Readout,
    used: FittedHead | None,
    encoder: Encoder,
    vocabulary: Vocabulary,
    *,
    seed: int,
    cache_dir: Path,
    control: RunControl,
) -> tuple[NamingConfig, Naming]:
    """Name the clusters of ``found`` (in the head's Z with ``used``, else in the encoder's feature space)."""
    naming_config = NamingConfig(seed=seed)
    if used is None:
        naming_config = naming_config.model_copy(update={"space": "raw"})
    stage = control.stage("name", len(vocabulary) + 2)
    label_vectors = embed_vocabulary(
        encoder, vocabulary, templates=SIMPLE_TEMPLATES, cache_dir=cache_dir, stage=stage
    )
    naming = name_clusters(
        store, found.labels, label_vectors, vocabulary, naming_config, fitted=used, z=found.z, stage=stage
    )
    return naming_config, naming


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
    """Cluster and name the images of ``source``; writes the clustering (``result.json`` included) to
    ``work_dir`` and returns the result.

    Resumable: the feature store in ``work_dir/features`` and the fitted head are reused when they match.
    Progress stages: ``embed``, ``fit``, ``readout`` and ``name``; :class:`~cpp.progress.Cancelled` is raised
    between batches after ``control.cancel()``. ``encoder`` and ``engine`` override the ones ``options``
    imply (default engine: local). With ``roots``, every file read (images, lists, annotations, vocabulary
    files) must resolve inside them (:mod:`cpp.sources`).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(control or RunControl())
    with stages.stage("embed") as run:
        encoder = encoder or create_encoder(options.model, device=options.device)
        check_vocabulary(encoder, options.vocabulary, work_dir / LABELS_DIR, roots)
        store = embed_source(
            source,
            work_dir / FEATURES_DIR,
            encoder,
            batch_size=options.batch_size,
            engine=engine,
            control=run,
            roots=roots,
        )
    return cluster_store(store, source, options, work_dir, encoder=encoder, stages=stages, roots=roots)


def cluster_store(
    store: FeatureStore,
    source: SourceSpec,
    options: ClusterOptions,
    work_dir: Path,
    *,
    encoder: Encoder,
    stages: Stages,
    roots: Roots = None,
    configs: HeadSettings | None = None,
) -> ClusterResult:
    """The stages after embedding (fit, readout, name) on ``store``, the features of ``source`` by
    ``encoder``; writes the clustering to ``work_dir`` and returns the result.

    ``cpp cluster`` (:func:`run_cluster`) and ``cpp fit`` both end here; ``configs`` overrides the head
    settings that :func:`head_configs` picks.
    """
    _check_size(source, store, options)
    rows = RowColumns.read(store)
    captions = (caption for row_captions in rows.captions for caption in row_captions)
    vocabulary = resolve_vocabulary(options.vocabulary, captions=captions, roots=roots)
    clusterer = choose_clusterer(len(store), options, work_dir / HEAD_DIR, configs)
    with stages.stage("fit") as run:
        clusterer.fit(store, run)
    with stages.stage("readout") as run:
        found, partition, used = clusterer.partition(store, run)
    with stages.stage("name") as run:
        naming_config, naming = name_partition(
            store,
            found,
            used,
            encoder,
            vocabulary,
            seed=options.seed,
            cache_dir=work_dir / LABELS_DIR,
            control=run,
        )
    return write_run(
        FinishedRun(
            work_dir=work_dir,
            source=source,
            options=options,
            encoder=encoder,
            store=store,
            rows=rows,
            head_info=clusterer.head_info,
            fit_info=clusterer.fit_info(len(store)),
            device=clusterer.device(encoder),
            found=found,
            partition=partition,
            used=used,
            vocabulary=vocabulary,
            naming_config=naming_config,
            naming=naming,
            timings=stages.timings,
            started=stages.started,
            inline_max=INLINE_ASSIGNMENTS_MAX,
        )
    )


def cluster_features(
    features: str | Path,
    options: ClusterOptions,
    work_dir: str | Path,
    *,
    control: RunControl | None = None,
    configs: HeadSettings | None = None,
) -> ClusterResult:
    """Cluster and name the feature store at ``features`` (written by ``cpp embed``): ``cpp fit``.

    The stages of :func:`run_cluster` after embedding (:func:`cluster_store`), with the store's own encoder
    (built from the spec it records; ``options.model`` is replaced by it) and source. The clustering in
    ``work_dir`` refers to the store through a symbolic link ``work_dir/features`` (never a copy).
    Progress stages: ``fit``, ``readout`` and ``name``.
    """
    store = FeatureStore.open(features)
    source = _store_source(store)
    options = options.model_copy(update={"model": store.encoder_id})
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(control or RunControl())
    encoder = _store_encoder(store, options.device)
    check_vocabulary(encoder, options.vocabulary, work_dir / LABELS_DIR)
    _link_store(work_dir / FEATURES_DIR, store.path)
    return cluster_store(store, source, options, work_dir, encoder=encoder, stages=stages, configs=configs)


def _store_source(store: FeatureStore) -> SourceSpec:
    try:
        return SourceSpec.model_validate(store.source)
    except ValidationError as exc:
        raise PipelineError(
            f"{store.path / META_FILE} records no image source ({exc.errors()[0]['msg']}): "
            "cluster a store written by `cpp embed`"
        ) from None


def _store_encoder(store: FeatureStore, device: str) -> Encoder:
    """The encoder that embedded ``store``, built here (naming embeds the vocabulary with it)."""
    spec = store.encoder_id
    try:
        encoder = create_encoder(spec, device=device)
    except CppError as exc:
        raise PipelineError(f"the encoder of {store.path} ({spec!r}) cannot be built here: {exc}") from exc
    mismatch = encoder_mismatch(store.encoder, encoder.describe())
    if mismatch:
        raise PipelineError(
            f"the encoder {spec!r} here is not the one that embedded {store.path}: {mismatch}"
        )
    return encoder


def _link_store(link: Path, store: Path) -> None:
    """Make ``link`` a symbolic link to the store directory ``store`` (atomically; nothing to do when
    ``link`` is that store); :class:`PipelineError` when ``link`` is another run's own store."""
    target = store.resolve()
    if link.exists() and link.resolve() == target:
        return
    if link.exists() and not link.is_symlink():
        raise PipelineError(f"{link} holds the feature store of another run: choose another output directory")
    partial = link.with_name(f".{link.name}.link.tmp")
    partial.unlink(missing_ok=True)
    partial.symlink_to(target, target_is_directory=True)
    os.replace(partial, link)


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
