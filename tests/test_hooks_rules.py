"""Each norm rule equals the one-backward-per-sample loop on random shapes (float64, relative 1e-6)."""

import pytest
import torch
from conftest import assert_rel_close
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from fimood.engine import explain, grad_norms
from fimood.engine.rules.linear import weight_sq_norms
from fimood.models import LikelihoodModel
from fimood.models.glow import ActNorm, InvConv1x1, LearnedPrior, ZeroConv2d

SETTINGS = settings(max_examples=15, deadline=None)


class Around(LikelihoodModel):
    """A layer inside a nonlinear loss, so every sample's output gradient differs."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def nll(self, x, seeds=None):
        out = self.layer(x)
        if isinstance(out, tuple):  # Glow layers: (y, log_det)
            return torch.sin(out[0]).flatten(1).sum(1) + 0.3 * out[1]
        return torch.sin(out).flatten(1).sum(1)


def hooks_equal_loop(layer: nn.Module, x: torch.Tensor) -> None:
    model = Around(layer.double())
    x = x.double()
    hooks = grad_norms(model, x, method="hooks")
    assert all(how.startswith("rule") for how in explain(model, x).values()), explain(model, x)
    assert_rel_close(hooks.sq_norms, grad_norms(model, x, method="loop").sq_norms)


@SETTINGS
@given(
    n=st.integers(1, 4),
    positions=st.lists(st.integers(1, 5), max_size=2),
    d=st.integers(1, 8),
    p=st.integers(1, 8),
    bias=st.booleans(),
)
def test_linear_on_inputs_of_any_rank(n, positions, d, p, bias):
    hooks_equal_loop(nn.Linear(d, p, bias=bias), torch.randn(n, *positions, d))


@SETTINGS
@given(
    n=st.integers(1, 3),
    c_in=st.sampled_from([1, 2, 4, 12]),
    c_out=st.sampled_from([2, 4]),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    two_d=st.booleans(),
)
def test_conv(n, c_in, c_out, kernel, stride, padding, dilation, groups, bias, padding_mode, two_d):
    assume(c_in % groups == 0 and (padding_mode == "zeros" or padding > 0))
    conv_type, shape = (nn.Conv2d, (7, 6)) if two_d else (nn.Conv1d, (9,))
    layer = conv_type(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    )
    hooks_equal_loop(layer, torch.randn(n, c_in, *shape))


@SETTINGS
@given(
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    spatial=st.sampled_from([(), (5,), (3, 4)]),
    train_bias=st.booleans(),
)
def test_group_norm(n, groups, spatial, train_bias):
    layer = nn.GroupNorm(groups, 4)
    with torch.no_grad():
        layer.weight.add_(torch.randn(4))
    layer.bias.requires_grad_(train_bias)
    hooks_equal_loop(layer, torch.randn(n, 4, *spatial))


@SETTINGS
@given(n=st.integers(1, 3), leading=st.lists(st.integers(1, 4), max_size=2), bias=st.booleans())
def test_layer_norm(n, leading, bias):
    layer = nn.LayerNorm(5, bias=bias)
    with torch.no_grad():
        layer.weight.add_(torch.randn(5))
    hooks_equal_loop(layer, torch.randn(n, *leading, 5))


def _perturbed(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("channels", [2, 3, 6])
@pytest.mark.parametrize("layer_type", [ActNorm, InvConv1x1])
def test_glow_layers_with_a_log_det_path(layer_type, channels):
    torch.manual_seed(channels)
    hooks_equal_loop(_perturbed(layer_type(channels)), torch.randn(3, channels, 4, 5))


def test_zero_conv_and_learned_prior():
    torch.manual_seed(0)
    hooks_equal_loop(_perturbed(ZeroConv2d(3, 4)), torch.randn(2, 3, 5, 5))
    hooks_equal_loop(_perturbed(LearnedPrior((2, 3, 3))), torch.randn(4, 2, 3, 3))


def test_frozen_parameters_are_skipped_by_rules():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    model = Around(layer.double())
    result = grad_norms(model, torch.randn(2, 3, dtype=torch.float64), method="hooks")
    assert result.names == ["layer.weight"]


def test_the_gram_path_never_gives_a_negative_squared_norm_when_positions_cancel():
    """Two positions with almost the same input and almost opposite output gradients: the per-sample
    gradient is nearly 0, and the Gram identity's float32 rounding must not take its squared norm
    below 0 (its log would be NaN)."""
    torch.manual_seed(0)
    a, g = torch.randn(512, 1, 300), torch.randn(512, 1, 200)
    activations = torch.cat([a, a + 1e-4 * torch.randn_like(a)], 1)
    backprops = torch.cat([g, -g + 1e-4 * torch.randn_like(g)], 1)
    positions, d, p = 2, 300, 200
    assert positions * (d + p) < d * p  # the Gram path is the one taken
    assert (weight_sq_norms(activations, backprops) >= 0).all()
