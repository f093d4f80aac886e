"""A trained clustering head as used after training: inference (:class:`FittedHead`, :class:`ContextTokens`)
and its checkpoint files.

A checkpoint is a directory with ``head.safetensors`` (the weights) and ``head.json`` (the head and training
configurations, the input dimension and the training history); both are written atomically. Training
itself is :mod:`cpp.train`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from cpp.devices import resolve_device
from cpp.errors import CppError
from cpp.features import FeatureInput, FeatureMatrix, as_matrix
from cpp.heads import HeadConfig, Tokens, TokenSets, build_head
from cpp.knn import build_index, knn_indices, normalize_rows, search_excluding

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"
#: Up to this many rows, context neighbours are searched among all rows; above it among a fixed random
#: sample of this many (the reference set), so no whole-set index or matrix is ever held in memory.
REFERENCE_MAX = 100_000


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 autocast for the head on CUDA (the rate terms upcast themselves); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def check_features(features: np.ndarray | FeatureMatrix) -> None:
    """Raise :class:`FitInputError` unless ``features`` is 2-D with at least 2 rows and 1 column."""
    if len(features.shape) != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise FitInputError(f"features must be a 2-D array with at least 2 rows, got shape {features.shape}")


class FitInputError(CppError):
    """The features (or a checkpoint) cannot be used for fitting."""


class FitConfig(BaseModel):
    """Training settings; saved beside every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1, description="None: enough epochs for ~target_steps steps")
    # 50, not 100: on six sets of 1,000-10,000 CIFAR-10 and Tiny ImageNet images the head's own partition
    # scored as well at half the steps (ACC up on 4 of 6) in half the fit time (docs/benchmarks/quality.md).
    target_steps: int = Field(default=50, ge=1, description="optimiser steps aimed at when epochs is None")
    max_epochs: int = Field(default=50, ge=1, description="cap on automatic epochs")
    batch_size: int = Field(default=512, ge=8)
    lr: float = Field(default=1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=1e-4, ge=0)
    cluster_weight_decay: float = Field(default=5e-3, ge=0, description="weight decay of the C projection")
    gamma: float = Field(default=1.0, ge=0, description="weight of R_c")
    beta: float = Field(default=0.05, ge=0, description="weight of ½‖Π‖²_F")
    eps2: float = Field(default=0.1, gt=0, description="ε² of the rate terms")
    temperature: float = Field(default=0.175, gt=0, description="Sinkhorn temperature on |CCᵀ|")
    sinkhorn_iters: int = Field(default=5, ge=1)
    cluster_rows: int | None = Field(
        default=128,
        ge=1,
        description="rows of Π (clusters) sampled per step for an unbiased estimate of R_c; None: all rows",
    )
    warmup_epochs: int = Field(default=1, ge=0, description="epochs on −R(Z) alone")
    view_k: int = Field(
        default=5,
        ge=0,
        description="neighbour views: half of each batch are samples, the other half one of each sample's "
        "view_k nearest neighbours (a positive pair for Π); 0: batches of independent samples",
    )
    max_train_samples: int = Field(default=50_000, ge=2, description="train on a random subset above this")
    seed: int = 0
    device: str = "auto"


class ContextTokens:
    """Token sets for any rows of a feature matrix: each row followed by its ``k`` nearest reference rows.

    The reference set is every row when there are at most ``reference_max`` (neighbours found once, exactly
    as in training), else a fixed random sample of ``reference_max`` rows searched through a faiss index.
    """

    def __init__(self, matrix: FeatureMatrix, k: int, *, seed: int = 0, reference_max: int = REFERENCE_MAX):
        self.k = k
        self._neighbours: np.ndarray | None = None
        self._index: Any = None
        self._rows = np.zeros(0, dtype=np.int64)
        self._reference = torch.zeros(0, matrix.dim)
        if k == 0:
            return
        n = len(matrix)
        if k >= n:
            raise FitInputError(f"context_k={k} needs more than {k} samples, got {n}")
        if n <= reference_max:
            reference = normalize_rows(matrix.all())
            self._neighbours = knn_indices(reference, k)
        else:
            rng = np.random.default_rng(seed)
            self._rows = np.sort(rng.choice(n, size=reference_max, replace=False))
            reference = normalize_rows(matrix.take(self._rows))
            self._index = build_index(reference, seed=seed)
        self._reference = torch.from_numpy(reference)

    def tokens(self, rows: np.ndarray, x: np.ndarray) -> Tokens:
        """Token sets ``(B, 1 + k)`` of ``rows`` whose unit features are ``x``."""
        own = torch.from_numpy(x)
        if self.k == 0:
            return own.unsqueeze(1)
        if self._neighbours is not None:
            neighbours = self._neighbours[rows]
        else:
            position = np.searchsorted(self._rows, rows)
            inside = self._rows[np.minimum(position, len(self._rows) - 1)] == rows
            neighbours = search_excluding(self._index, x, np.where(inside, position, -1), self.k)
        return TokenSets.with_context(own, self._reference, torch.from_numpy(neighbours))


@dataclass
class FittedHead:
    """A trained head with its configuration and training history."""

    head: torch.nn.Module
    head_config: HeadConfig
    fit_config: FitConfig
    in_dim: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def context(self, features: FeatureInput | FeatureMatrix) -> ContextTokens:
        """The context-token builder of ``features`` for this head (reusable across calls)."""
        return ContextTokens(as_matrix(features), self.head_config.context_k, seed=self.fit_config.seed)

    def _check_dim(self, matrix: FeatureMatrix) -> None:
        check_features(matrix)
        if matrix.dim != self.in_dim:
            raise FitInputError(f"features have dimension {matrix.dim}, the head expects {self.in_dim}")

    @torch.no_grad()
    def encode(
        self, rows: np.ndarray, x: np.ndarray, context: ContextTokens, *, chunk_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(Z, C)`` float32 of ``rows`` with raw features ``x``; context tokens from ``context``."""
        x = normalize_rows(x)
        z_out = np.empty((len(x), self.head_config.z_dim), dtype=np.float32)
        c_out = np.empty_like(z_out)
        device = self.device
        self.head.eval()
        for start in range(0, len(x), chunk_size):
            stop = min(start + chunk_size, len(x))
            tokens = context.tokens(rows[start:stop], x[start:stop]).to(device, non_blocking=True)
            with autocast(device):
                z, c = self.head(tokens)
            z_out[start:stop] = z.float().cpu().numpy()
            c_out[start:stop] = c.float().cpu().numpy()
        return z_out, c_out

    def transform_blocks(
        self, features: FeatureInput | FeatureMatrix, *, context: ContextTokens | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first_row, Z, C)`` block by block over every row (streamed; one block in memory at a time)."""
        matrix = as_matrix(features)
        self._check_dim(matrix)
        context = context or self.context(matrix)
        for start, block in matrix.blocks():
            z, c = self.encode(np.arange(start, start + len(block)), block, context)
            yield start, z, c

    def transform(
        self, features: FeatureInput | FeatureMatrix, *, context: ContextTokens | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(Z, C)`` float32 of every row, as two in-memory arrays."""
        matrix = as_matrix(features)
        z_dim = self.head_config.z_dim
        z_out = np.empty((len(matrix), z_dim), dtype=np.float32)
        c_out = np.empty((len(matrix), z_dim), dtype=np.float32)
        for start, z, c in self.transform_blocks(matrix, context=context):
            z_out[start : start + len(z)] = z
            c_out[start : start + len(c)] = c
        return z_out, c_out

    def save(self, directory: str | Path) -> None:
        """Write ``head.safetensors`` and ``head.json`` (configs, input dim, history) to ``directory``.

        Both are written under temporary names first and then renamed, so neither is ever half-written; the
        JSON records the weights' SHA-256, so that a save interrupted between the two renames is detected
        on load instead of pairing new weights with an old configuration.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights, config = directory / f"{WEIGHTS_FILE}.tmp", directory / f"{CONFIG_FILE}.tmp"
        state = {name: t.detach().cpu().contiguous() for name, t in self.head.state_dict().items()}
        save_file(state, str(weights))
        meta = {
            "in_dim": self.in_dim,
            "head": self.head_config.model_dump(),
            "fit": self.fit_config.model_dump(),
            "history": self.history,
            "weights_sha256": _sha256(weights),
        }
        config.write_text(json.dumps(meta, indent=2))
        os.replace(weights, directory / WEIGHTS_FILE)
        os.replace(config, directory / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> FittedHead:
        """Read a head written by :meth:`save`."""
        directory = Path(directory)
        weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for path in (weights, config):
            if not path.is_file():
                raise FitInputError(
                    f"{path} is missing: pass the head directory of a clustering, RUN/head of a "
                    "`cpp fit` or `cpp cluster` run (written by FittedHead.save)"
                )
        try:
            meta = json.loads(config.read_text())
            head_config = HeadConfig.model_validate(meta["head"])
            fit_config = FitConfig.model_validate(meta["fit"])
            in_dim = int(meta["in_dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FitInputError(f"{config} is not a valid head configuration: {exc}") from exc
        recorded = meta.get("weights_sha256")  # absent in heads saved before it was recorded
        if recorded is not None and recorded != _sha256(weights):
            raise FitInputError(
                f"{weights} does not match {config} (a save interrupted half-way?): fit the head again"
            )
        head = build_head(head_config, in_dim)
        try:
            head.load_state_dict(load_file(str(weights)))
        except (RuntimeError, OSError, ValueError) as exc:  # wrong shapes or names, a damaged file
            raise FitInputError(f"{weights} cannot be loaded as the head {config} describes: {exc}") from None
        head.to(resolve_device(device)).eval()
        return cls(head, head_config, fit_config, in_dim, list(meta.get("history", [])))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
