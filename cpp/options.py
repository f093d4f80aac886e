"""User-facing request models: what to cluster (``SourceSpec``) and how (``ClusterOptions``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SourceType = Literal["folder", "files", "webdataset", "coco"]


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
    vocabulary: list[str] = Field(
        default_factory=lambda: ["imagenet1k"],
        max_length=16,
        description="built-in vocabularies (imagenet1k, coco80, cifar10, cifar100), 'captions', "
        "or paths of files with one name per line",
    )
    epochs: int | None = Field(default=None, ge=1, le=1000, description="training epochs (None: automatic)")
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1, le=4096, description="embedding batch size")
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda[:N]'")
