"""The method's invariance (docs/method.md): an invertible, parameter-free change of representation leaves every feature
unchanged, while the likelihood (and so Typicality) changes."""

import math

import torch
from conftest import assert_rel_close

from fimood import layerwise_grad_norms
from fimood.models import LikelihoodModel


class ExpRepresentation(LikelihoodModel):
    """The same model seen through y = exp(x): nll_Y(y) = nll_X(log y) + log|det J_exp(log y)| (in bits/dim)."""

    def __init__(self, base: LikelihoodModel):
        super().__init__()
        self.base = base
        self.image_shape = base.image_shape

    def nll(self, y, seeds=None):
        x = torch.log(y)
        dims = x[0].numel()
        return self.base.nll(x, seeds) + x.flatten(1).sum(1) / (dims * math.log(2.0))


def test_features_are_invariant_to_an_invertible_change_of_representation(glow64):
    x = torch.randint(0, 256, (4, 1, 8, 8)).double() / 255.0
    seeds = torch.arange(4)
    transformed = ExpRepresentation(glow64)
    y = torch.exp(x)
    for method in ("loop", "vmap"):
        assert_rel_close(
            layerwise_grad_norms(transformed, y, seeds, method), layerwise_grad_norms(glow64, x, seeds, method)
        )
    assert not torch.allclose(transformed.nll(y, seeds), glow64.nll(x, seeds))
