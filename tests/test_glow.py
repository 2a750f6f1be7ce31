"""Glow: parameter layout of the presets, exact log-determinants, batch-independent NLL."""

import pytest
import torch
from conftest import tiny_glow

from fimood.models import Glow, GlowConfig
from fimood.models.glow import ActNorm, AffineCoupling, InvConv1x1


def test_paper_preset_matches_the_paper_size():
    model = Glow.from_preset("paper")
    params = list(model.parameters())
    assert len(params) == 1351
    assert abs(sum(p.numel() for p in params) / 1e6 - 44.2) < 0.1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image_shape": (1, 28, 28), "levels": 3}, "divisible by 8"),
        ({"hidden_channels": 0}, "hidden_channels must be positive"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        GlowConfig(**config)


def test_unknown_preset_is_named_in_the_error():
    with pytest.raises(ValueError, match="'huge'"):
        Glow.from_preset("huge")


def _jacobian_log_det(layer, x):
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(x.shape))[0].flatten(), x.flatten())
    return torch.linalg.slogdet(jacobian)[1]


@pytest.mark.parametrize("layer_type", [ActNorm, InvConv1x1, AffineCoupling])
def test_layer_log_det_equals_the_jacobian(layer_type):
    torch.manual_seed(0)
    layer = (layer_type(4, 3) if layer_type is AffineCoupling else layer_type(4)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[1].reshape(()), _jacobian_log_det(layer, x))


def test_nll_of_a_row_does_not_depend_on_its_batch(glow64):
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    seeds = torch.arange(7) * 1000
    batch = glow64.nll(x, seeds)
    alone = torch.cat([glow64.nll(x[i : i + 1], seeds[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(batch, alone)


def test_seeds_change_the_dequantisation_and_none_is_the_midpoint(glow64):
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    assert not torch.equal(glow64.nll(x, torch.tensor([1, 2, 3])), glow64.nll(x, torch.tensor([4, 5, 6])))
    torch.testing.assert_close(glow64.nll(x), glow64.nll(x))


def test_wrong_image_shape_is_a_clear_error(glow64):
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        glow64.nll(torch.rand(2, 3, 8, 8, dtype=torch.float64))


def test_initialize_sets_actnorm_from_data():
    model = tiny_glow()
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64)
    model.initialize(x)
    first = model.levels[0][0].actnorm
    from fimood.models.glow import squeeze

    h = model.dequantize(x, None)
    normalised = first(squeeze(h))[0]
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
