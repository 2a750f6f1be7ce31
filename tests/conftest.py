"""Shared fixtures: small float64 models and user-defined likelihood models with odd structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fimood.models import Glow, GlowConfig, LikelihoodModel


def tiny_glow(dtype: torch.dtype = torch.float64, seed: int = 0, image_shape=(1, 8, 8)) -> Glow:
    """A tiny Glow, ActNorm initialised on random data, zero-convs made non-zero (every gradient non-trivial)."""
    torch.manual_seed(seed)
    model = Glow(GlowConfig(image_shape=image_shape, hidden_channels=4, depth=2, levels=2)).to(dtype)
    model.initialize(torch.rand(16, *image_shape, dtype=dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "net.4" in name or "split_priors" in name or name.startswith("top_prior"):
                p.add_(0.05 * torch.randn_like(p))
    return model


class OddUserModel(LikelihoodModel):
    """A user's model: Linear on a 3-D input, GroupNorm, a parameter used twice, a frozen parameter."""

    image_shape = (1, 4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.row_linear = nn.Linear(6, 5)  # applied to (B, 4, 6): rows as a sequence
        self.norm = nn.GroupNorm(2, 4)
        self.shared = nn.Parameter(torch.randn(5) * 0.3)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.head = nn.Linear(5, 1, bias=False)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.row_linear(x[:, 0]))  # (B, 4, 5)
        h = self.norm(h) * self.shared + self.frozen  # GroupNorm over the 4 "channels"
        h = torch.tanh(h + self.shared)  # the shared parameter's second use
        return (self.head(h).squeeze(-1) ** 2).sum(1) + 0.5 * math.log(2 * math.pi)


@pytest.fixture
def glow64() -> Glow:
    return tiny_glow()


@pytest.fixture
def user_model() -> OddUserModel:
    torch.manual_seed(1)
    return OddUserModel().double()


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-6) -> None:
    scale = expected.abs().clamp_min(1e-12)
    worst = ((actual - expected).abs() / scale).max().item()
    assert worst <= rtol, f"max relative difference {worst:.3g} > {rtol}"
