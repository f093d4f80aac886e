"""The pydantic result schema shared by ``cpp cluster`` and the service (``schema_version`` marks changes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = "1.0"


class SkippedFile(BaseModel):
    """A source item that could not be used, and why."""

    key: str
    path: str | None = None
    reason: str


class Counts(BaseModel):
    items: int = Field(description="Items the source yielded.")
    embedded: int = Field(description="Items embedded and clustered.")
    skipped: int = Field(description="Items skipped (see `skipped`).")


class KSelection(BaseModel):
    """How the number of clusters was chosen."""

    method: Literal["fixed", "coding_length", "silhouette"]
    k: int
    candidates: list[int] = Field(default_factory=list)
    coding_length: list[float] = Field(
        default_factory=list, description="Coding length (bits) of the partition at each candidate K."
    )


#: How the rows of the features' kNN graph were made from the unit features (cpp.readout.graph_rows).
GraphRows = Literal["centred", "sqrt-centred"]


class PartitionChoice(BaseModel):
    """Which partition the result shows, and the label-free evidence for it."""

    method: Literal["head", "features", "direct"] = Field(
        description="head: the head's readout; features: spectral clustering of the encoder features, "
        "chosen because it codes them in fewer bits; direct: small collection, k-means of the features."
    )
    coding_length: dict[str, float] = Field(
        default_factory=dict, description="Bits to code the encoder features given each candidate partition."
    )
    dims: int | None = Field(default=None, description="Principal directions the features are coded on.")
    eps2: float | None = Field(default=None, description="Distortion ε² of the coding length.")
    graph: GraphRows | None = Field(
        default=None,
        description="Rows of the kNN graph behind the features' partition: the centred unit features, "
        "after element-wise square roots when every feature is non-negative ('sqrt-centred').",
    )


class RunInfo(BaseModel):
    """How the result was produced: enough to reproduce it."""

    encoder: dict[str, Any] = Field(description="Encoder id, dimension, preprocessing and precision.")
    head: dict[str, Any] = Field(description="Head configuration (type, widths, layers, context_k, ...).")
    fit: dict[str, Any] = Field(default_factory=dict, description="Training configuration and final losses.")
    k_selection: KSelection
    partition: PartitionChoice | None = Field(default=None, description="How the partition was obtained.")
    naming: dict[str, Any] = Field(default_factory=dict, description="Vocabularies and binding strategy.")
    source: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    counts: Counts
    skipped: list[SkippedFile] = Field(default_factory=list)
    device: str = "cpu"
    seed: int = 0
    created_at: str
    work_dir: str | None = Field(
        default=None, description="The work directory (the clustering) that holds this run's files."
    )


class NameScore(BaseModel):
    name: str
    score: float


class Cluster(BaseModel):
    id: int
    size: int
    name: str
    score: float = Field(description="Binding score of `name` (cosine similarity in the label space).")
    uncertain: bool = Field(description="True when the margin to the runner-up name is small.")
    alternatives: list[NameScore] = Field(default_factory=list, description="Runner-up names, best first.")
    representatives: list[str] = Field(
        default_factory=list, description="Keys of members nearest the centre."
    )


class Assignment(BaseModel):
    key: str
    path: str | None = None
    cluster: int
    confidence: float
    label: str | None = Field(default=None, description="The image's own best-binding name.")
    label_score: float | None = None
    true_label: str | None = Field(default=None, description="Ground truth from the source, when known.")


class Edit(BaseModel):
    """One curation step of a clustering's edit log (:mod:`cpp.clustering`)."""

    op: Literal["rename", "merge", "move", "split", "outlier", "restore", "update"]
    args: dict[str, Any] = Field(default_factory=dict, description="The step's arguments, as requested.")
    revision: int = Field(default=0, description="The revision this step produced.")
    at: str = Field(default="", description="When it was made (ISO 8601, UTC).")


class ClusterResult(BaseModel):
    """The labeled clustering of one collection."""

    schema_version: str = SCHEMA_VERSION
    run: RunInfo
    clusters: list[Cluster]
    assignments: list[Assignment] | None = Field(
        default=None, description="Per-image assignments; None when written separately (`assignments_file`)."
    )
    assignments_file: str | None = Field(
        default=None, description="JSONL file with one Assignment per line, relative to the result file."
    )
    metrics: dict[str, float] | None = Field(
        default=None, description="ACC/NMI/ARI against ground-truth labels, when the source has them."
    )
    revision: int = Field(
        default=0, description="The clustering's revision this result shows (0 = as fitted)."
    )
    edits: list[Edit] = Field(
        default_factory=list, description="The edits that made this revision, oldest first."
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`ClusterResult`."""
    return ClusterResult.model_json_schema()
