"""Every gradient engine equals the one-backward-per-sample loop in float64."""

import pytest
import torch
from conftest import OddUserModel, assert_rel_close, tiny_glow

from fimood import layerwise_grad_norms
from fimood.engine import grad_norms
from fimood.models import GroupSum


def test_loop_is_the_squared_norm_of_each_samples_gradient(user_model):
    x = torch.randn(3, 1, 4, 6, dtype=torch.float64)
    sq_norms = layerwise_grad_norms(user_model, x, method="loop")
    user_model.zero_grad()
    user_model.nll(x[1:2]).sum().backward()
    expected = [p.grad.pow(2).sum() for p in user_model.parameters() if p.requires_grad]
    torch.testing.assert_close(sq_norms[1], torch.stack(expected))


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 4, 4)])
def test_vmap_equals_loop_on_glow(image_shape):
    model = tiny_glow(image_shape=image_shape)
    x = torch.rand(5, *image_shape, dtype=torch.float64)
    seeds = torch.arange(5) + 100
    loop = grad_norms(model, x, seeds, "loop")
    vmap = grad_norms(model, x, seeds, "vmap")
    assert_rel_close(vmap.sq_norms, loop.sq_norms)
    torch.testing.assert_close(vmap.nll, loop.nll)
    assert vmap.names == loop.names == [name for name, _ in model.named_parameters()]


def test_vmap_equals_loop_on_an_odd_user_model(user_model):
    x = torch.randn(6, 1, 4, 6, dtype=torch.float64)
    loop = layerwise_grad_norms(user_model, x, method="loop")
    assert_rel_close(layerwise_grad_norms(user_model, x, method="vmap"), loop)
    assert_rel_close(layerwise_grad_norms(user_model, x, method="auto"), loop)


def test_frozen_parameters_get_no_feature(user_model):
    names = grad_norms(user_model, torch.randn(2, 1, 4, 6, dtype=torch.float64), method="vmap").names
    assert "frozen" not in names and "shared" in names
    assert len(names) == sum(p.requires_grad for p in user_model.parameters())


def test_a_parameter_the_loss_does_not_reach_has_zero_norm():
    class Unused(OddUserModel):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.ones(3))

    model = Unused().double()
    x = torch.randn(2, 1, 4, 6, dtype=torch.float64)
    for method in ("loop", "vmap"):
        result = grad_norms(model, x, method=method)
        assert (result.sq_norms[:, result.names.index("unused")] == 0).all()


def test_grouped_features_are_those_of_the_summed_loss(glow64):
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    seeds = torch.arange(6).reshape(2, 3)
    grouped = grad_norms(GroupSum(glow64), x, seeds, "vmap").sq_norms
    glow64.zero_grad()
    glow64.nll(x[1], seeds[1]).sum().backward()
    expected = torch.stack([p.grad.pow(2).sum() for p in glow64.parameters()])
    assert_rel_close(grouped[1], expected)
    assert_rel_close(grad_norms(GroupSum(glow64), x, seeds, "loop").sq_norms, grouped)


def test_unknown_method_is_named_in_the_error(glow64):
    with pytest.raises(ValueError, match=r"method must be one of .* got 'fast'"):
        layerwise_grad_norms(glow64, torch.rand(1, 1, 8, 8, dtype=torch.float64), method="fast")


def test_a_model_with_nothing_trainable_is_refused(glow64):
    glow64.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        layerwise_grad_norms(glow64, torch.rand(1, 1, 8, 8, dtype=torch.float64))


def test_seeds_must_match_the_batch(glow64):
    with pytest.raises(ValueError, match="one row per sample"):
        layerwise_grad_norms(glow64, torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.arange(3))
