"""Training a clustering head by rate reduction: maximise R(Z) − γ R_c(Z, Π) − (β/2)‖Π‖²_F.

Π is the doubly stochastic membership Sinkhorn derives from the cluster codes C. Training starts with a
warm-up on −R(Z) alone, after which the C projection is initialised from the Z projection. Without image
augmentations, positive pairs come from *neighbour views*: half of each batch are anchors, the other half a
random near neighbour of each anchor (``FitConfig.view_k``). The trained head is a
:class:`cpp.head_model.FittedHead` (inference and checkpoints).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cpp.devices import resolve_device
from cpp.features import FeatureInput, FeatureMatrix, as_matrix
from cpp.head_model import FitConfig, FitInputError, FittedHead, autocast, check_features
from cpp.heads import CrateHead, HeadConfig, Tokens, TokenSets, build_head
from cpp.knn import knn_indices, normalize_rows
from cpp.logging import get_logger
from cpp.progress import RunControl
from cpp.rate import coding_rate, coding_rate_clusters, membership

log = get_logger("fit")


def _tokens(x: torch.Tensor, neighbours: torch.Tensor | None, rows: torch.Tensor) -> Tokens:
    """Token sets ``(B, 1 + k)``: each row followed by its context neighbours. On the CPU by reference
    (each distinct row embedded once); elsewhere dense, since finding the distinct rows would make the host
    wait for the device at every step."""
    if neighbours is None:
        return x[rows].unsqueeze(1)
    index = torch.cat([rows.unsqueeze(1), neighbours[rows]], dim=1)
    return TokenSets.gather(x, index) if x.device.type == "cpu" else x[index]


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


def _training_rows(matrix: FeatureMatrix, config: FitConfig) -> np.ndarray:
    """The unit rows to train on: all of them, or a seeded random sample above ``max_train_samples``."""
    rng = np.random.default_rng(config.seed)
    n_all = len(matrix)
    if n_all > config.max_train_samples:
        subset = np.sort(rng.choice(n_all, size=config.max_train_samples, replace=False))
        train = matrix.take(subset)
        log.info("training on a random subset of %d of %d samples", len(subset), n_all)
    else:
        train = matrix.all()
    if not np.isfinite(train).all():
        raise FitInputError("features contain NaN or infinite values; re-embed or drop those rows")
    return normalize_rows(train)


def _optimizer(head: torch.nn.Module, config: FitConfig) -> torch.optim.AdamW:
    """AdamW with the C projection in its own group (its own weight decay)."""
    c_ids = {id(p) for p in head.get_submodule("c_proj").parameters()}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in head.parameters() if id(p) not in c_ids]},
        {
            "params": list(head.get_submodule("c_proj").parameters()),
            "weight_decay": config.cluster_weight_decay,
        },
    ]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class _EpochSteps:
    """The optimiser steps of one training epoch of :func:`fit_head`; ``generator`` draws each epoch's order
    of the rows and, with neighbour views, each anchor's neighbour."""

    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: FitConfig
    x: torch.Tensor  # (n, d) unit training rows, on the training device
    neighbours: torch.Tensor | None  # (n, context_k) context neighbours, on the device
    view_neighbours: torch.Tensor | None  # (n, view_k) on the CPU; None: batches of independent rows
    batch: int
    steps: int
    generator: torch.Generator
    sample_pi: torch.Generator
    control: RunControl

    def _rows(self, order: torch.Tensor, step: int) -> torch.Tensor:
        if self.view_neighbours is None:
            return order[step * self.batch : (step + 1) * self.batch].to(self.x.device)
        half = max(1, self.batch // 2)
        anchors = order[step * half : (step + 1) * half]
        pick = torch.randint(self.view_neighbours.shape[1], (len(anchors),), generator=self.generator)
        return torch.cat([anchors, self.view_neighbours[anchors, pick]]).to(self.x.device)

    def run(self, warmup: bool) -> dict[str, float]:
        """One epoch; the mean loss and rate terms of its steps."""
        order = torch.randperm(len(self.x), generator=self.generator)
        sums: dict[str, torch.Tensor] = {}
        for step in range(self.steps):
            self.control.check_cancelled()
            rows = self._rows(order, step)
            with autocast(self.x.device):
                z, c = self.head(_tokens(self.x, self.neighbours, rows))
            loss, terms = rate_reduction_loss(z, c, self.config, warmup=warmup, generator=self.sample_pi)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + value
        return {name: float(value) / self.steps for name, value in sums.items()}


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
    # Over 60 lines on purpose: the setup's random draws (initial weights, then the generators of batches and
    # rows of Π) must stay in this order for runs to keep reproducing, so they are made in one place.
    matrix = as_matrix(features)
    check_features(matrix)
    head_config = head_config or HeadConfig()
    fit_config = fit_config or FitConfig()
    control = control or RunControl()
    device = resolve_device(fit_config.device)
    x_np = _training_rows(matrix, fit_config)
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
    batch = min(fit_config.batch_size, n)
    epoch_steps = _EpochSteps(
        head=head,
        optimizer=_optimizer(head, fit_config),
        config=fit_config,
        x=x,
        neighbours=neighbours,
        view_neighbours=view_neighbours,
        batch=batch,
        steps=max(1, n // (max(1, batch // 2) if view_k else batch)),
        generator=torch.Generator(device="cpu").manual_seed(fit_config.seed),
        sample_pi=sample_pi,
        control=control,
    )
    epochs = fit_config.epochs or auto_epochs(n, fit_config)
    history: list[dict[str, float]] = []
    stage = control.stage("fit", epochs, unit="epoch")
    head.train()
    try:
        for epoch in range(epochs):
            warmup = epoch < fit_config.warmup_epochs
            if epoch == fit_config.warmup_epochs and epoch > 0:
                c_proj.load_state_dict(z_proj.state_dict())
            started = time.perf_counter()
            record = epoch_steps.run(warmup)
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
