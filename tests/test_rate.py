"""Coding-rate terms against closed forms, gradients by gradcheck, and Sinkhorn marginals."""

from __future__ import annotations

import math

import pytest
import torch

from cpp.rate import coding_length, coding_rate, coding_rate_clusters, membership, sinkhorn


def _orthonormal_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``(n, d)`` with orthonormal rows (n ≤ d)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return q.T.contiguous()


def test_coding_rate_closed_form_orthonormal_rows() -> None:
    # ZZᵀ = I_n, so R = n/2 · log(1 + d/(n ε²)).
    n, d, eps2 = 6, 16, 0.1
    z = _orthonormal_rows(n, d)
    expected = n / 2 * math.log(1 + d / (n * eps2))
    assert coding_rate(z, eps2).item() == pytest.approx(expected, rel=1e-10)


def test_coding_rate_subspace_closed_form_uses_smaller_side() -> None:
    # n samples spread evenly over an orthonormal basis of a k-dim subspace: ZᵀZ has k eigenvalues n/k.
    n, d, k, eps2 = 40, 8, 4, 0.1
    basis = _orthonormal_rows(k, d)
    z = basis.repeat(n // k, 1)
    expected = k / 2 * math.log(1 + d / (n * eps2) * n / k)
    assert coding_rate(z, eps2).item() == pytest.approx(expected, rel=1e-10)
    assert coding_rate(z.T.contiguous() * math.sqrt(d / n), eps2).dim() == 0  # wide input also works


def test_coding_rate_batched_and_upcast() -> None:
    z = torch.randn(3, 5, 7)
    batched = coding_rate(z)
    single = torch.stack([coding_rate(zi) for zi in z])
    assert torch.allclose(batched, single, atol=1e-5)
    half = coding_rate(z.to(torch.bfloat16))
    assert half.dtype == torch.float32


def test_coding_rate_clusters_orthogonal_subspaces() -> None:
    # Two clusters on orthogonal 3-dim subspaces, hard membership: each term has the closed form.
    d, per, k_dim, eps2 = 12, 30, 3, 0.1
    basis = _orthonormal_rows(2 * k_dim, d)
    z = torch.cat([basis[:k_dim].repeat(per // k_dim, 1), basis[k_dim:].repeat(per // k_dim, 1)])
    n = z.shape[0]
    pi = torch.zeros(2, n, dtype=torch.float64)
    pi[0, :per] = 1
    pi[1, per:] = 1
    term = k_dim / 2 * math.log(1 + d / (per * eps2) * per / k_dim)
    expected = 2 * (per / n) * term
    assert coding_rate_clusters(z, pi, eps2).item() == pytest.approx(expected, rel=1e-8)
    # One cluster holding everything equals R(Z).
    assert coding_rate_clusters(z, torch.ones(1, n, dtype=torch.float64), eps2).item() == pytest.approx(
        coding_rate(z, eps2).item(), rel=1e-8
    )


def test_coding_rate_clusters_soft_membership_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(40, 9, dtype=torch.float64, generator=g), dim=1)
    pi = torch.rand(5, 40, dtype=torch.float64, generator=g)
    n, d, eps2 = 40, 9, 0.1
    expected = 0.0
    for row in pi:  # Σ_j tr(Π_j)/(2n) · logdet(I + d/(tr(Π_j) ε²) Zᵀ diag(Π_j) Z)
        tr = float(row.sum())
        gram = z.T @ (row[:, None] * z)
        expected += (
            tr / (2 * n) * float(torch.logdet(torch.eye(d, dtype=torch.float64) + d / (tr * eps2) * gram))
        )
    assert coding_rate_clusters(z, pi, eps2).item() == pytest.approx(expected, rel=1e-7)


def test_coding_rate_clusters_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="pi must have shape"):
        coding_rate_clusters(torch.randn(5, 3), torch.ones(2, 4))


def test_gradcheck_rate_terms() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: coding_rate(a), (z,))
    assert torch.autograd.gradcheck(lambda a, b: coding_rate_clusters(a, membership(b, 0.5)), (z, c))


def test_coding_length_prefers_true_partition() -> None:
    d, per = 16, 60
    g = torch.Generator().manual_seed(0)
    basis = _orthonormal_rows(8, d)
    groups = [
        torch.randn(per, 2, generator=g, dtype=torch.float64) @ basis[2 * i : 2 * i + 2] for i in range(4)
    ]
    z = torch.nn.functional.normalize(torch.cat(groups), dim=1)
    truth = torch.arange(4).repeat_interleave(per)
    merged = truth // 2
    shuffled = truth[torch.randperm(len(truth), generator=g)]
    assert coding_length(z, truth) < coding_length(z, merged)
    assert coding_length(z, truth) < coding_length(z, shuffled)
    # Label cost: a single cluster costs no label bits, so its length is the data term alone.
    one = torch.zeros(len(truth), dtype=torch.long)
    n = len(truth)
    data_bits = (n + d) / 2 * 2 * coding_rate(z, 0.1) / math.log(2.0)
    assert coding_length(z, one).item() == pytest.approx(data_bits.item(), rel=1e-8)


@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_sinkhorn_doubly_stochastic(zero_diagonal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 20, generator=g, dtype=torch.float64) * 2
    p = sinkhorn(logits, iterations=200, zero_diagonal=zero_diagonal)
    assert torch.allclose(p.sum(0), torch.ones(20, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p.sum(1), torch.ones(20, dtype=torch.float64), atol=1e-6)
    assert (p >= 0).all()
    if zero_diagonal:
        assert torch.diagonal(p).abs().max() == 0


def test_membership_float32_under_low_precision_codes() -> None:
    c = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).to(torch.bfloat16)
    p = membership(c, 0.175, 5)
    assert p.dtype == torch.float32
    assert torch.allclose(p.sum(0), torch.ones(16), atol=1e-5)
