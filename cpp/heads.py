"""Clustering heads over frozen features: the white-box CRATE head (default) and CPP's MLP head.

Both map token sets ``(B, T, in_dim)`` — a sample followed by its ``context_k`` nearest neighbours — to two
unit-norm outputs of the sample's own token: ``Z`` (subspace features) and ``C`` (cluster codes). The sets
come as a dense tensor or as :class:`TokenSets` (each distinct row once, embedded once). Initial weights are
drawn from the ``generator`` given to :func:`build_head` (torch's global one without), in the order and with
the distributions of torch's default initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cpp.rate import coding_rate


class HeadConfig(BaseModel):
    """Architecture of a head; saved beside every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["crate", "mlp"] = "crate"
    width: int = Field(default=256, ge=8, description="model width (CRATE) or hidden width (MLP)")
    layers: int = Field(default=2, ge=1, description="CRATE layers")
    heads: int = Field(default=8, ge=1, description="MSSA heads (subspaces) per CRATE layer")
    z_dim: int = Field(default=128, ge=2, description="dimension of Z and C")
    context_k: int = Field(default=10, ge=0, description="nearest neighbours added as context tokens")
    step_size: float = Field(default=0.1, gt=0, description="ISTA step size η")
    sparsity: float = Field(default=0.1, ge=0, description="ISTA threshold λ")
    attention_scale: float = Field(default=1.0, gt=0, description="extra factor on MSSA logits")


@dataclass(frozen=True, eq=False)
class TokenSets:
    """Token sets by reference: token ``t`` of set ``b`` is ``rows[index[b, t]]``.

    Neighbouring samples share context rows (in a training batch about 40 % of the tokens repeat one,
    at inference each row recurs in ~``context_k`` sets), so the CRATE head embeds each row once.
    """

    rows: torch.Tensor  # (U, in_dim) raw features
    index: torch.Tensor  # (B, T) int64 into rows

    @classmethod
    def gather(cls, features: torch.Tensor, index: torch.Tensor) -> TokenSets:
        """The sets ``features[index]``, keeping each distinct row of ``features`` once."""
        distinct, inverse = torch.unique(index, return_inverse=True)
        return cls(features[distinct], inverse)

    @classmethod
    def with_context(cls, own: torch.Tensor, reference: torch.Tensor, neighbours: torch.Tensor) -> TokenSets:
        """Each row of ``own`` ``(B, d)`` followed by its ``neighbours`` ``(B, k)``, rows of ``reference``."""
        distinct, inverse = torch.unique(neighbours, return_inverse=True)
        first = torch.arange(len(own)).unsqueeze(1)
        return cls(torch.cat([own, reference[distinct]]), torch.cat([first, len(own) + inverse], dim=1))

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TokenSets:
        return TokenSets(
            self.rows.to(device, non_blocking=non_blocking), self.index.to(device, non_blocking=non_blocking)
        )

    def dense(self) -> torch.Tensor:
        """``(B, T, in_dim)``: the sets written out."""
        return self.rows[self.index]

    def first(self) -> torch.Tensor:
        """``(B, in_dim)``: each set's own (first) token."""
        return self.rows[self.index[:, 0]]


#: A head's input: dense token sets ``(B, T, in_dim)`` or the same by reference.
Tokens = torch.Tensor | TokenSets


def _linear(in_features: int, out_features: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear`` with its default initialisation drawn from ``generator``."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class MSSA(nn.Module):
    """Multi-head subspace self-attention: one basis ``U_k`` per head for query, key, value and output."""

    def __init__(
        self, width: int, heads: int, scale: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.scale = scale / math.sqrt(self.head_dim)
        # U_k are column blocks of one orthogonal matrix: the initial subspaces are mutually orthogonal.
        q = nn.init.orthogonal_(torch.empty(width, width), generator=generator)
        self.bases = nn.Parameter(q.view(width, heads, self.head_dim).permute(1, 0, 2).contiguous())

    def _stacked(self) -> torch.Tensor:
        """``(width, heads·head_dim)``: the bases side by side, so that projecting on all heads is one GEMM
        (several times faster on a CPU than a batched product of narrow ``head_dim`` columns)."""
        return self.bases.permute(1, 0, 2).reshape(self.bases.shape[1], -1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, T, width)`` in each head's subspace: ``(B, heads, T, head_dim)``."""
        b, t, _ = x.shape
        return (x @ self._stacked()).view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, first_only: bool = False) -> torch.Tensor:
        """``(B, T, width)``, or with ``first_only`` the first token's output alone ``(B, 1, width)`` (it
        still attends to every token)."""
        q = self.project(x)
        queries = q[:, :, :1] if first_only else q
        attn = torch.softmax(queries @ q.transpose(-1, -2) * self.scale, dim=-1)
        mixed = (attn @ q).transpose(1, 2).reshape(len(x), queries.shape[2], self.heads * self.head_dim)
        return mixed @ self._stacked().T


class ISTA(nn.Module):
    """One non-negative ISTA step on ``min λ‖z‖₁ + ½‖x − Dz‖²`` from ``z = x``."""

    def __init__(
        self, width: int, step_size: float, threshold: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.dictionary = nn.Parameter(torch.empty(width, width))
        nn.init.kaiming_uniform_(self.dictionary, a=math.sqrt(5), generator=generator)
        self.step_size = step_size
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dictionary
        residual = x - x @ d.T  # x − D z with z = x
        return F.relu(x + self.step_size * (residual @ d) - self.step_size * self.threshold)


class CrateLayer(nn.Module):
    """Compression (MSSA with residual) then sparsification (ISTA), each after a LayerNorm."""

    def __init__(
        self,
        width: int,
        heads: int,
        step_size: float,
        threshold: float,
        scale: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = MSSA(width, heads, scale, generator)
        self.norm_ista = nn.LayerNorm(width)
        self.ista = ISTA(width, step_size, threshold, generator)

    def forward(self, x: torch.Tensor, *, first_only: bool = False) -> torch.Tensor:
        """The layer on tokens ``(B, T, width)``; ``first_only``: the first token's output alone."""
        compressed = (x[:, :1] if first_only else x) + self.attn(self.norm_attn(x), first_only=first_only)
        return self.ista(self.norm_ista(compressed))

    @torch.no_grad()
    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The layer's output and its white-box statistics on tokens ``x``."""
        normed = self.norm_attn(x)
        before = _mean_head_rate(self.attn.project(normed))
        compressed = x + self.attn(normed)
        after = _mean_head_rate(self.attn.project(self.norm_attn(compressed)))
        out = self.ista(self.norm_ista(compressed))
        stats = {
            "coding_rate_before": float(before),
            "coding_rate_after": float(after),
            "sparsity": float((out == 0).float().mean()),
        }
        return out, stats


def _mean_head_rate(projected: torch.Tensor) -> torch.Tensor:
    """Mean over samples and heads of the coding rate of a sample's tokens in one head's subspace."""
    return coding_rate(F.normalize(projected, dim=-1)).mean()


class CrateHead(nn.Module):
    """Linear embedding, ``layers`` CRATE layers, then unit-norm Z and C projections of the first token."""

    input_mean: torch.Tensor

    def __init__(self, config: HeadConfig, in_dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        # Pretrained features share a large common direction; removing the data-set mean (set by the
        # trainer, saved with the weights) lets the subspaces separate what differs between samples.
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.embed = _linear(in_dim, config.width, generator)
        self.layers = nn.ModuleList(
            CrateLayer(
                config.width,
                config.heads,
                config.step_size,
                config.sparsity,
                config.attention_scale,
                generator,
            )
            for _ in range(config.layers)
        )
        self.norm_out = nn.LayerNorm(config.width)
        self.z_proj = _linear(config.width, config.z_dim, generator)
        self.c_proj = _linear(config.width, config.z_dim, generator)

    def _embed(self, tokens: Tokens) -> torch.Tensor:
        if isinstance(tokens, TokenSets):
            # F.embedding: its backward sums the gradients of repeated rows in a fixed order (indexing's
            # does not on the CPU, so runs would differ in the last bits).
            return F.embedding(tokens.index, self.embed(F.normalize(tokens.rows - self.input_mean, dim=-1)))
        return self.embed(F.normalize(tokens - self.input_mean, dim=-1))

    def trunk(self, tokens: Tokens) -> torch.Tensor:
        # Only the first token is read out, so the last layer computes that token's output alone (the
        # same values; its MSSA, residual and ISTA on one token instead of 1 + context_k).
        x = self._embed(tokens)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, first_only=i == last)
        return self.norm_out(x[:, 0])

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(tokens)
        return F.normalize(self.z_proj(h), dim=-1), F.normalize(self.c_proj(h), dim=-1)

    @torch.no_grad()
    def layer_stats(self, tokens: Tokens) -> list[dict[str, float]]:
        """Per layer: mean coding rate of the tokens in each head's subspace before and after compression,
        and the fraction of zeros after the ISTA step."""
        x = self._embed(tokens)
        out = []
        for i, layer in enumerate(self.layers):
            x, stats = cast(CrateLayer, layer).stats(x)
            out.append({"layer": float(i), **stats})
        return out


class MLPHead(nn.Module):
    """CPP's head: linear-BN-ReLU-linear-ReLU, then linear Z and C projections (first token only)."""

    def __init__(self, config: HeadConfig, in_dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _linear(in_dim, config.width, generator),
            nn.BatchNorm1d(config.width),
            nn.ReLU(),
            _linear(config.width, config.width, generator),
            nn.ReLU(),
        )
        self.z_proj = _linear(config.width, config.z_dim, generator)
        self.c_proj = _linear(config.width, config.z_dim, generator)

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(tokens.first() if isinstance(tokens, TokenSets) else tokens[:, 0])
        return F.normalize(self.z_proj(h), dim=-1), F.normalize(self.c_proj(h), dim=-1)


def build_head(config: HeadConfig, in_dim: int, *, generator: torch.Generator | None = None) -> nn.Module:
    """The head ``config`` describes, for inputs of dimension ``in_dim``, initialised from ``generator``."""
    if config.type == "crate":
        return CrateHead(config, in_dim, generator)
    return MLPHead(config, in_dim, generator)
