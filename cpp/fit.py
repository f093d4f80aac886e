"""Training a clustering head by rate reduction: maximise R(Z) − γ R_c(Z, Π) − (β/2)‖Π‖²_F.

Π is the doubly stochastic membership Sinkhorn derives from the cluster codes C. Training starts with a
warm-up on −R(Z) alone, after which the C projection is initialised from the Z projection. Without image
augmentations, positive pairs come from *neighbour views*: half of each batch are anchors, the other half a
random near neighbour of each anchor (``FitConfig.view_k``). Checkpoints are a safetensors file with the
configuration as JSON beside it.
"""

from __future__ import annotations

import json
import math
import time
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
from cpp.heads import CrateHead, HeadConfig, build_head
from cpp.knn import build_index, knn_indices, normalize_rows, search_excluding
from cpp.logging import get_logger
from cpp.progress import RunControl
from cpp.rate import coding_rate, coding_rate_clusters, membership

log = get_logger("fit")

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"
#: Up to this many rows, context neighbours are searched among all rows; above it among a fixed random
#: sample of this many (the reference set), so no whole-set index or matrix is ever held in memory.
REFERENCE_MAX = 100_000


class FitInputError(CppError):
    """The features (or a checkpoint) cannot be used for fitting."""


class FitConfig(BaseModel):
    """Training settings; saved beside every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1, description="None: enough epochs for ~target_steps steps")
    target_steps: int = Field(default=100, ge=1, description="optimiser steps aimed at when epochs is None")
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


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bfloat16 autocast for the head on CUDA (the rate terms upcast themselves); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def _check_features(features: np.ndarray | FeatureMatrix) -> None:
    if len(features.shape) != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise FitInputError(f"features must be a 2-D array with at least 2 rows, got shape {features.shape}")


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

    def tokens(self, rows: np.ndarray, x: np.ndarray) -> torch.Tensor:
        """``(B, 1 + k, d)`` token sets of ``rows`` whose unit features are ``x``."""
        own = torch.from_numpy(x).unsqueeze(1)
        if self.k == 0:
            return own
        if self._neighbours is not None:
            neighbours = self._neighbours[rows]
        else:
            position = np.searchsorted(self._rows, rows)
            inside = self._rows[np.minimum(position, len(self._rows) - 1)] == rows
            neighbours = search_excluding(self._index, x, np.where(inside, position, -1), self.k)
        return torch.cat([own, self._reference[torch.from_numpy(neighbours)]], dim=1)


def _tokens(x: torch.Tensor, neighbours: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Token sets ``(B, 1 + k, d)``: each row followed by its context neighbours."""
    if neighbours is None:
        return x[rows].unsqueeze(1)
    return x[torch.cat([rows.unsqueeze(1), neighbours[rows]], dim=1)]


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
        _check_features(matrix)
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
            with _autocast(device):
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
        """Write ``head.safetensors`` and ``head.json`` (configs, input dim, history) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.head.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        meta = {
            "in_dim": self.in_dim,
            "head": self.head_config.model_dump(),
            "fit": self.fit_config.model_dump(),
            "history": self.history,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> FittedHead:
        """Read a head written by :meth:`save`."""
        directory = Path(directory)
        weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for path in (weights, config):
            if not path.is_file():
                raise FitInputError(
                    f"{path} is missing: pass a directory written by `cpp fit` (FittedHead.save)"
                )
        try:
            meta = json.loads(config.read_text())
            head_config = HeadConfig.model_validate(meta["head"])
            fit_config = FitConfig.model_validate(meta["fit"])
            in_dim = int(meta["in_dim"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FitInputError(f"{config} is not a valid head configuration: {exc}") from exc
        head = build_head(head_config, in_dim)
        head.load_state_dict(load_file(str(weights)))
        head.to(resolve_device(device)).eval()
        return cls(head, head_config, fit_config, in_dim, list(meta.get("history", [])))


def auto_epochs(n_train: int, config: FitConfig) -> int:
    """Epochs giving about ``target_steps`` optimiser steps (at least warm-up + 1, at most ``max_epochs``)."""
    batch = min(config.batch_size, n_train)
    steps_per_epoch = max(1, n_train // (max(1, batch // 2) if config.view_k else batch))
    epochs = math.ceil(config.target_steps / steps_per_epoch)
    return max(config.warmup_epochs + 1, min(epochs, config.max_epochs))


def rate_reduction_loss(
    z: torch.Tensor,
    c: torch.Tensor,
    config: FitConfig,
    *,
    warmup: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss and its terms (device tensors, no host sync); the rows of Π sampled for R_c are
    drawn from ``generator`` (on the device of ``c``)."""
    r = coding_rate(z, config.eps2)
    if warmup:
        return -r, {"rate": r.detach()}
    pi = membership(c, config.temperature, config.sinkhorn_iters)
    n = pi.shape[0]
    if config.cluster_rows is not None and config.cluster_rows < n:
        rows = torch.randperm(n, device=pi.device, generator=generator)[: config.cluster_rows]
        rc = coding_rate_clusters(z, pi[rows], config.eps2) * (n / config.cluster_rows)
    else:
        rc = coding_rate_clusters(z, pi, config.eps2)
    fro = (pi * pi).sum()
    loss = -r + config.gamma * rc + 0.5 * config.beta * fro
    return loss, {"rate": r.detach(), "rate_clusters": rc.detach(), "pi_fro2": fro.detach()}


def fit_head(
    features: FeatureInput,
    head_config: HeadConfig | None = None,
    fit_config: FitConfig | None = None,
    *,
    control: RunControl | None = None,
) -> FittedHead:
    """Train a head on ``features`` ``(N, d)`` or a feature store (rows are L2-normalised here).

    Above ``max_train_samples`` rows it trains on a random sample of them (read by index from a store).
    The same features, configurations and seed give the same weights, also in concurrent threads, as long as
    the number of CPU threads is the same (another count sums floats in another order).
    """
    matrix = as_matrix(features)
    _check_features(matrix)
    head_config = head_config or HeadConfig()
    fit_config = fit_config or FitConfig()
    control = control or RunControl()
    device = resolve_device(fit_config.device)
    rng = np.random.default_rng(fit_config.seed)
    n_all = len(matrix)
    if n_all > fit_config.max_train_samples:
        subset = np.sort(rng.choice(n_all, size=fit_config.max_train_samples, replace=False))
        train = matrix.take(subset)
        log.info("training on a random subset of %d of %d samples", len(subset), n_all)
    else:
        train = matrix.all()
    if not np.isfinite(train).all():
        raise FitInputError("features contain NaN or infinite values; re-embed or drop those rows")
    x_np = normalize_rows(train)
    n, in_dim = x_np.shape
    k = head_config.context_k
    if k >= n:
        raise FitInputError(f"context_k={k} needs more than {k} samples, got {n}; lower --context-k")
    view_k = min(fit_config.view_k, n - 1)
    # One search serves both the context tokens and the neighbour views (faiss returns nearest first).
    knn = torch.from_numpy(knn_indices(x_np, max(k, view_k)))
    neighbours = knn[:, :k].contiguous().to(device) if k else None
    # Neighbour views: every epoch visits each sample once as an anchor, paired with a random neighbour.
    view_neighbours = knn[:, :view_k].contiguous() if view_k else None
    x = torch.from_numpy(x_np).to(device)

    # Every random draw comes from generators of this call, never torch's global one, so that runs in other
    # threads (concurrent service jobs) cannot shift it. They give what torch.manual_seed(seed) gave before:
    # the head's initial weights, then (CPU) the sampled rows of Π.
    init = torch.Generator().manual_seed(fit_config.seed)
    head = build_head(head_config, in_dim, generator=init).to(device)
    sample_pi = init if device.type == "cpu" else torch.Generator(device).manual_seed(fit_config.seed)
    if isinstance(head, CrateHead):
        head.input_mean.copy_(x.mean(0))
    z_proj, c_proj = head.get_submodule("z_proj"), head.get_submodule("c_proj")
    c_ids = {id(p) for p in c_proj.parameters()}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in head.parameters() if id(p) not in c_ids]},
        {"params": list(c_proj.parameters()), "weight_decay": fit_config.cluster_weight_decay},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=fit_config.lr,
        weight_decay=fit_config.weight_decay,
    )
    batch = min(fit_config.batch_size, n)
    half = max(1, batch // 2)
    steps_per_epoch = max(1, n // (half if view_k else batch))
    epochs = fit_config.epochs or auto_epochs(n, fit_config)
    generator = torch.Generator(device="cpu").manual_seed(fit_config.seed)
    history: list[dict[str, float]] = []
    stage = control.stage("fit", epochs, unit="epoch")
    head.train()
    try:
        for epoch in range(epochs):
            warmup = epoch < fit_config.warmup_epochs
            if epoch == fit_config.warmup_epochs and epoch > 0:
                c_proj.load_state_dict(z_proj.state_dict())
            started = time.perf_counter()
            order = torch.randperm(n, generator=generator)
            sums: dict[str, torch.Tensor] = {}
            for step in range(steps_per_epoch):
                control.check_cancelled()
                if view_neighbours is None:
                    rows = order[step * batch : (step + 1) * batch].to(device)
                else:
                    anchors = order[step * half : (step + 1) * half]
                    pick = torch.randint(view_neighbours.shape[1], (len(anchors),), generator=generator)
                    rows = torch.cat([anchors, view_neighbours[anchors, pick]]).to(device)
                with _autocast(device):
                    z, c = head(_tokens(x, neighbours, rows))
                loss, terms = rate_reduction_loss(z, c, fit_config, warmup=warmup, generator=sample_pi)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in {"loss": loss.detach(), **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value
            record = {name: float(value) / steps_per_epoch for name, value in sums.items()}
            if not all(math.isfinite(v) for v in record.values()):
                raise FitInputError(
                    f"training diverged at epoch {epoch + 1} ({record}); lower the learning rate (lr)"
                )
            record.update(epoch=float(epoch + 1), seconds=time.perf_counter() - started)
            history.append(record)
            stage.show(loss=f"{record['loss']:.3f}")
            log.debug("epoch %d/%d %s", epoch + 1, epochs, record)
            stage.advance()
    finally:
        stage.close()
    head.eval()
    return FittedHead(head, head_config, fit_config.model_copy(update={"epochs": epochs}), in_dim, history)
