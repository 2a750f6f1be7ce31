"""GroupNorm and LayerNorm: elementwise affine maps of the normalised input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fimood.engine.rules.registry import register_rule, trainable


def _affine_sq_norms(
    layer: nn.Module, normalised: Tensor, g: Tensor, reduce_dims: tuple[int, ...]
) -> dict[str, Tensor]:
    """Squared norms of Σ g·x̂ (weight) and Σ g (bias) over `reduce_dims`, the positions sharing one parameter."""

    def per_sample(t: Tensor) -> Tensor:
        summed = t.sum(reduce_dims) if reduce_dims else t  # sum(()) would reduce every dimension
        return summed.flatten(1).pow(2).sum(1)

    sq_norms = {}
    if trainable(layer, "weight"):
        sq_norms["weight"] = per_sample(g * normalised)
    if trainable(layer, "bias"):
        sq_norms["bias"] = per_sample(g)
    return sq_norms


@register_rule(nn.GroupNorm)
def group_norm_sq_norms(layer: nn.GroupNorm, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """Per-channel weight and bias: gradients summed over the spatial positions of each sample."""
    x, g = inputs[0], grad_outputs[0]
    normalised = F.group_norm(x, layer.num_groups, eps=layer.eps)
    return _affine_sq_norms(layer, normalised, g, tuple(range(2, x.dim())))


@register_rule(nn.LayerNorm)
def layer_norm_sq_norms(layer: nn.LayerNorm, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """Weight and bias over the normalised shape: gradients summed over the leading positions of each sample."""
    x, g = inputs[0], grad_outputs[0]
    normalised = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    leading = tuple(range(1, x.dim() - len(layer.normalized_shape)))
    return _affine_sq_norms(layer, normalised, g, leading)
