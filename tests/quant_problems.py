"""Weights and inputs with a known structure for the quantizer tests: low-rank inputs with a few
outlier feature columns (as LLM activations have), weights with a few large entries."""

from __future__ import annotations

import torch


def structured_problem(
    out_features: int = 96,
    in_features: int = 128,
    tokens: int = 1024,
    rank: int = 64,
    outliers: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W [out, in], X [tokens, in], H = XᵀX/tokens)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, rank, generator=g)
    A = torch.randn(rank, in_features, generator=g)
    X = Z @ A / rank**0.5 + 0.05 * torch.randn(tokens, in_features, generator=g)
    cols = torch.randperm(in_features, generator=g)[:outliers]
    X[:, cols] *= 10
    W = 0.02 * torch.randn(out_features, in_features, generator=g)
    spikes = torch.rand(out_features, in_features, generator=g) < 0.01
    W = W + spikes * 0.1 * torch.randn(out_features, in_features, generator=g)
    return W, X, X.t() @ X / tokens


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    """‖XWᵀ − XQᵀ‖ / ‖XWᵀ‖, computed from X directly (independent of the H-based formula)."""
    return float((X @ (W - Q).t()).norm() / (X @ W.t()).norm())
