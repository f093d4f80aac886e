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
from typing import Any

import numpy as np
import torch

from cpp.devices import resolve_device
from cpp.features import FeatureInput, as_matrix
from cpp.head_model import FitConfig, FitInputError, FittedHead, autocast, check_features
from cpp.heads import CrateHead, HeadConfig, build_head
from cpp.knn import knn_indices, normalize_rows
from cpp.logging import get_logger
from cpp.progress import RunControl
from cpp.rate import coding_rate, coding_rate_clusters, membership

log = get_logger("fit")


def _tokens(x: torch.Tensor, neighbours: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Token sets ``(B, 1 + k, d)``: each row followed by its context neighbours."""
    if neighbours is None:
        return x[rows].unsqueeze(1)
    return x[torch.cat([rows.unsqueeze(1), neighbours[rows]], dim=1)]


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
    # Over 60 lines on purpose: one training loop whose random draws (subset, initial weights, batches, rows
    # of Π) must stay in this order for runs to keep reproducing; split, the order would be spread out.
    matrix = as_matrix(features)
    check_features(matrix)
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
                with autocast(device):
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
