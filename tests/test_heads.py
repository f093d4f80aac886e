"""Head shapes, unit-norm outputs, tied subspaces and CRATE's white-box statistics."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from cpp.heads import CrateHead, HeadConfig, TokenSets, build_head


@pytest.mark.parametrize("kind", ["crate", "mlp"])
@pytest.mark.parametrize("context_k", [0, 3])
def test_outputs_are_unit_norm(kind: Literal["crate", "mlp"], context_k: int) -> None:
    torch.manual_seed(0)
    config = HeadConfig(type=kind, width=32, layers=2, heads=4, z_dim=16, context_k=context_k)
    head = build_head(config, in_dim=24).eval()
    z, c = head(torch.randn(5, 1 + context_k, 24))
    assert z.shape == c.shape == (5, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(c.norm(dim=1), torch.ones(5), atol=1e-5)


def test_crate_output_is_the_own_token_and_uses_context() -> None:
    torch.manual_seed(0)
    head = build_head(HeadConfig(width=32, heads=4, z_dim=8, context_k=2), 12).eval()
    tokens = torch.randn(3, 3, 12)
    z, _ = head(tokens)
    changed = tokens.clone()
    changed[:, 1:] = torch.randn(3, 2, 12)
    z_changed, _ = head(changed)
    assert not torch.allclose(z, z_changed)  # neighbours influence the sample's output via attention


def test_initial_subspaces_are_orthonormal() -> None:
    head = build_head(HeadConfig(width=16, heads=4, layers=1), 8)
    assert isinstance(head, CrateHead)
    u = head.get_parameter("layers.0.attn.bases")
    stacked = u.permute(1, 0, 2).reshape(16, 16)
    assert torch.allclose(stacked.T @ stacked, torch.eye(16), atol=1e-5)


def test_layer_stats_report_rates_and_sparsity() -> None:
    torch.manual_seed(0)
    head = build_head(HeadConfig(width=32, layers=3, heads=4, context_k=4), 10)
    assert isinstance(head, CrateHead)
    stats = head.layer_stats(torch.randn(6, 5, 10))
    assert len(stats) == 3
    for layer in stats:
        assert 0.0 <= layer["sparsity"] <= 1.0
        assert layer["coding_rate_before"] > 0
        assert layer["coding_rate_after"] > 0


def test_width_must_divide_into_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_head(HeadConfig(width=30, heads=4), 8)


@pytest.mark.parametrize("kind", ["crate", "mlp"])
def test_token_sets_by_reference_give_the_dense_outputs(kind: Literal["crate", "mlp"]) -> None:
    head = build_head(HeadConfig(type=kind, width=32, heads=4, z_dim=8), 16, generator=torch.Generator())
    head.eval()
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    index = torch.randint(0, 40, (12, 6), generator=torch.Generator().manual_seed(2))
    sets = TokenSets.gather(features, index)
    assert len(sets.rows) == len(index.unique())
    torch.testing.assert_close(sets.dense(), features[index])
    for dense, by_reference in zip(head(features[index]), head(sets), strict=True):
        torch.testing.assert_close(by_reference, dense)
    own = torch.randn(12, 16, generator=torch.Generator().manual_seed(3))
    context = TokenSets.with_context(own, features, index[:, 1:])
    torch.testing.assert_close(context.dense(), torch.cat([own[:, None], features[index[:, 1:]]], dim=1))


def test_last_layer_computes_the_read_out_token_as_the_full_layer_does() -> None:
    head = CrateHead(HeadConfig(width=32, heads=4, z_dim=8, layers=3), 16, torch.Generator().manual_seed(0))
    tokens = torch.randn(10, 5, 16, generator=torch.Generator().manual_seed(1))
    x = head._embed(tokens)
    for layer in head.layers:
        x = layer(x)  # every token through every layer
    torch.testing.assert_close(head.trunk(tokens), head.norm_out(x[:, 0]))
