"""Coding-rate terms of rate reduction (MCR²), coding length of a partition, and log-domain Sinkhorn.

Pure tensor functions. Every log-determinant runs in float32 or better with autocast disabled, whatever the
caller's precision, and the results come back in that working precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

DEFAULT_EPS2 = 0.1


def _working(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to float32 unless it is already float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _LogdetSPD(torch.autograd.Function):
    """``logdet`` of a batch of symmetric positive-definite matrices by Cholesky, with the gradient
    ``A⁻¹`` taken from the same factor (cheaper than differentiating through the factorisation)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        chol = torch.linalg.cholesky(a)
        ctx.save_for_backward(chol)
        return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (chol,) = ctx.saved_tensors
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        return grad[..., None, None] * (chol_inv.transpose(-1, -2) @ chol_inv)  # A⁻¹ = L⁻ᵀ L⁻¹


def _logdet_identity_plus(gram: torch.Tensor) -> torch.Tensor:
    """``logdet(I + gram)`` of a batch of symmetric PSD matrices ``(..., m, m)``."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    out: torch.Tensor = _LogdetSPD.apply(eye + gram)
    return out


def _weighted_grams(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(k, d, d)``: ``Zᵀ diag(w_j) Z`` for each row ``w_j`` of ``weights`` ``(k, n)``, as one GEMM against
    the upper triangles of the per-sample outer products (half the work of the full ``d²`` products)."""
    d = z.shape[1]
    upper_rows, upper_cols = torch.triu_indices(d, d, device=z.device)
    upper = z.index_select(1, upper_rows) * z.index_select(1, upper_cols)  # (n, d(d+1)/2)
    packed = weights @ upper  # (k, d(d+1)/2)
    full = torch.zeros(weights.shape[0], d * d, dtype=z.dtype, device=z.device)
    full = full.index_copy(1, upper_rows * d + upper_cols, packed)
    grams = full.view(-1, d, d)
    return grams + torch.triu(grams, diagonal=1).transpose(1, 2)


def coding_rate(z: torch.Tensor, eps2: float = DEFAULT_EPS2) -> torch.Tensor:
    """R(Z) = ½ logdet(I + d/(n ε²) ZᵀZ) in nats, for ``z`` of shape ``(..., n, d)`` (rows are samples).

    Uses whichever Gram matrix (d×d or n×n) is smaller; both give the same determinant.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _working(z)
        n, d = z.shape[-2], z.shape[-1]
        alpha = d / (n * eps2)
        gram = z.transpose(-1, -2) @ z if d <= n else z @ z.transpose(-1, -2)
        return 0.5 * _logdet_identity_plus(alpha * gram)


def coding_rate_clusters(z: torch.Tensor, pi: torch.Tensor, eps2: float = DEFAULT_EPS2) -> torch.Tensor:
    """R_c(Z, Π) = Σ_j tr(Π_j)/(2n) · logdet(I + d/(tr(Π_j) ε²) Zᵀ diag(Π_j) Z) in nats.

    ``z`` is ``(n, d)``; ``pi`` is ``(k, n)`` with row ``j`` the (soft) membership of every sample in
    cluster ``j`` (for CPP's doubly stochastic ``n×n`` Π, cluster ``j`` is "the neighbourhood of sample j").
    """
    if pi.dim() != 2 or pi.shape[1] != z.shape[0]:
        raise ValueError(f"pi must have shape (k, {z.shape[0]}), got {tuple(pi.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _working(z)
        pi = pi.to(z.dtype)
        n, d = z.shape
        tr = pi.sum(1) + 1e-8
        grams = _weighted_grams(z, pi)  # (k, d, d) weighted covariances Zᵀ diag(π_j) Z
        scale = (d / (tr * eps2)).view(-1, 1, 1)
        logdets = _logdet_identity_plus(scale * grams)
        return (tr * logdets).sum() / (2.0 * n)


def coding_length(z: torch.Tensor, labels: torch.Tensor, eps2: float = DEFAULT_EPS2) -> torch.Tensor:
    """Bits to code ``z`` ``(n, d)`` up to distortion ε² given a hard partition ``labels`` ``(n,)``.

    L = Σ_j [(n_j + d)/2 · log2 det(I + d/(n_j ε²) Z_jᵀZ_j) − n_j log2(n_j/n)] (Ma et al., 2007), the second
    term being the cost of the labels. Empty clusters contribute nothing.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _working(z)
        n, d = z.shape
        counts_all = torch.bincount(labels)
        present = torch.nonzero(counts_all).flatten().tolist()
        # One d×d Gram per non-empty cluster (K is small; n·d² work in all).
        grams = torch.stack([z[labels == j].T @ z[labels == j] for j in present])
        counts = counts_all[present].to(z.dtype)
        logdets = _logdet_identity_plus((d / (counts * eps2)).view(-1, 1, 1) * grams) / math.log(2.0)
        data_bits = ((counts + d) / 2.0 * logdets).sum()
        label_bits = -(counts * torch.log2(counts / n)).sum()
        return data_bits + label_bits


def sinkhorn(log_affinity: torch.Tensor, iterations: int = 5, *, zero_diagonal: bool = False) -> torch.Tensor:
    """Doubly stochastic matrix from a square log-affinity (rows and columns → 1) by log-domain Sinkhorn.

    A fixed number of iterations, no convergence test, so there is no host synchronisation inside the loop.
    The last step normalises columns, so columns sum to one exactly and rows approximately (closer with more
    iterations). ``zero_diagonal`` forbids self-membership.
    """
    if log_affinity.dim() != 2 or log_affinity.shape[0] != log_affinity.shape[1]:
        raise ValueError(f"log_affinity must be square, got {tuple(log_affinity.shape)}")
    with torch.autocast(device_type=log_affinity.device.type, enabled=False):
        logk = _working(log_affinity)
        if zero_diagonal:
            eye = torch.eye(logk.shape[0], dtype=torch.bool, device=logk.device)
            logk = logk.masked_fill(eye, float("-inf"))
        log_u = torch.zeros(logk.shape[0], dtype=logk.dtype, device=logk.device)
        log_v = torch.zeros_like(log_u)
        for _ in range(iterations):
            log_u = -torch.logsumexp(logk + log_v.unsqueeze(0), dim=1)
            log_v = -torch.logsumexp(logk + log_u.unsqueeze(1), dim=0)
        return torch.exp(logk + log_u.unsqueeze(1) + log_v.unsqueeze(0))


def membership(
    c: torch.Tensor, temperature: float, iterations: int = 5, *, zero_diagonal: bool = False
) -> torch.Tensor:
    """CPP's membership Π: Sinkhorn on the log-affinity ``|C Cᵀ| / temperature`` of cluster codes ``c``."""
    with torch.autocast(device_type=c.device.type, enabled=False):
        c = _working(c)
        return sinkhorn((c @ c.T).abs() / temperature, iterations, zero_diagonal=zero_diagonal)
