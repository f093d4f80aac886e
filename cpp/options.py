"""User-facing request models: what to cluster (``SourceSpec``) and how (``ClusterOptions``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SourceType = Literal["folder", "files", "webdataset", "coco"]
#: Largest seed: seeds feed 32-bit generators (numpy, faiss) as well as torch's.
MAX_SEED = 2**31 - 1
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"
EngineName = Literal["auto", "device", "local", "ray"]
StoreDtype = Literal["float16", "float32"]
#: Built-in vocabularies (:mod:`cpp.vocab`), here so that option parsing needs no model code.
BUILTIN_VOCABULARIES = ("imagenet1k", "coco80", "cifar10", "cifar100")
#: The vocabulary spec that means "the captions found in the source".
CAPTIONS = "captions"
ExportFormat = Literal["json", "csv", "coco", "folders"]
#: Members per cluster page of a static gallery, by default (``cpp gallery --members``).
STATIC_MEMBERS = 48
#: The embedding batch size and the torch device, shared by every request that embeds images.
EmbedBatchSize = Annotated[int, Field(ge=1, le=4096, description="embedding batch size")]
Device = Annotated[str, Field(pattern=DEVICE_PATTERN, description="'auto', 'cpu' or 'cuda[:N]'")]


class SourceSpec(BaseModel):
    """Where the images are.

    - ``folder``: a directory, searched recursively.
    - ``files``: a ``.txt`` (one path per line) or ``.csv`` (a ``path`` column) file list.
    - ``webdataset``: img2dataset tar shards; brace patterns like ``shards/{00000..00099}.tar``.
    - ``coco``: a COCO image folder; ``annotations`` names the instances and/or captions JSON files.
    """

    model_config = ConfigDict(extra="forbid")

    type: SourceType
    path: str = Field(min_length=1, max_length=4096)
    labels_from_folders: bool = Field(
        default=False, description="folder sources: use each image's parent folder name as its true label"
    )
    annotations: list[str] = Field(default_factory=list, description="coco sources: annotation JSON files")


class ClusterOptions(BaseModel):
    """How to cluster and name a collection."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="auto", max_length=512, description="encoder spec (see `cpp encoders`)")
    clusters: Literal["auto"] | Annotated[int, Field(ge=2, le=1000)] = Field(
        default="auto", description="'auto' or a fixed number of clusters"
    )
    head: Literal["crate", "mlp"] = "crate"
    vocabulary: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=lambda: ["imagenet1k"],
        min_length=1,
        max_length=16,
        description="built-in vocabularies (imagenet1k, coco80, cifar10, cifar100), 'captions', "
        "or paths of files with one name per line",
    )
    epochs: int | None = Field(default=None, ge=1, le=1000, description="training epochs (None: automatic)")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="random seed (same seed, same clusters)")
    batch_size: EmbedBatchSize = 64
    device: Device = "auto"


class AssignOptions(BaseModel):
    """How to assign new images to an existing clustering (``cpp assign``, ``POST .../assignments``)."""

    model_config = ConfigDict(extra="forbid")

    novelty_quantile: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="novel below this quantile of the members' novelty scores (None: as calibrated)",
    )
    batch_size: EmbedBatchSize = 64
    device: Device = "auto"


class EmbedOptions(BaseModel):
    """How ``cpp embed`` stores features (its batch size is :attr:`ClusterOptions.batch_size`)."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(default=4096, ge=1, description="items per store chunk")
    dtype: StoreDtype = Field(default="float16", description="stored feature precision")
    max_pixels: int = Field(default=64_000_000, ge=1, description="skip images with more pixels")


class EngineOptions(BaseModel):
    """Where images are decoded and encoded (:mod:`cpp.engines`), with the limits of each setting."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineName = "local"
    workers: int | None = Field(default=None, ge=0, description="decode worker processes on this machine")
    ray_actors: int | None = Field(default=None, ge=1, description="embedding actors")
    ray_gpus_per_actor: float | None = Field(default=None, ge=0, description="GPUs per actor")
    ray_cpus_per_actor: float | None = Field(
        default=None, gt=0, description="CPUs (decode threads) per actor"
    )


class FitOptions(BaseModel):
    """Head training settings of ``cpp fit`` besides ClusterOptions' (defaults and limits of ``FitConfig``
    and ``HeadConfig``)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=512, ge=8, description="training batch size")
    context_k: int = Field(default=10, ge=0, description="nearest neighbours added as context tokens")
    view_k: int = Field(default=5, ge=0, description="neighbours a training view is drawn from")


class ExportOptions(BaseModel):
    """What ``cpp export`` writes."""

    format: ExportFormat = Field(
        default="json",
        description="json (result with assignments inline), csv (path, key, cluster, name, confidence), "
        "coco (image-level labels, a category per cluster name) or folders (symlinks per cluster)",
    )


class GalleryOptions(BaseModel):
    """What ``cpp gallery`` includes."""

    members: int = Field(
        default=STATIC_MEMBERS, ge=1, le=2000, description="images per cluster page (the most confident)"
    )
