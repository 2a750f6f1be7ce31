"""Linear layers on inputs of any rank: x (B, ..., d) → y (B, ..., p)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fimood.engine.rules.registry import register_rule, trainable


def weight_sq_norms(activations: Tensor, backprops: Tensor) -> Tensor:
    """‖Σ_t g_t a_tᵀ‖² per sample, for a (B, T, d) and g (B, T, p), by the cheaper of two exact ways.

    Explicit per-sample gradients cost B·T·d·p; the Gram ("ghost norm") identity
    ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} ⟨a_t, a_s⟩⟨g_t, g_s⟩ costs B·T²·(d + p). Its sum can round below zero
    when positions' gradients cancel (a norm of about zero), so it is clamped at zero.
    """
    _, positions, d = activations.shape
    p = backprops.shape[-1]
    if positions * (d + p) < d * p:
        activation_gram = activations @ activations.transpose(1, 2)
        backprop_gram = backprops @ backprops.transpose(1, 2)
        return (activation_gram * backprop_gram).flatten(1).sum(1).clamp_min(0.0)
    per_sample = backprops.transpose(1, 2) @ activations
    return per_sample.pow(2).flatten(1).sum(1)


@register_rule(nn.Linear, NonDynamicallyQuantizableLinear)
def linear_sq_norms(layer: nn.Linear, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """Weight by `weight_sq_norms` over all positions of the sample; bias as the summed output gradient."""
    x, g = inputs[0], grad_outputs[0]
    batch = x.shape[0]
    activations = x.reshape(batch, -1, x.shape[-1])
    backprops = g.reshape(batch, -1, g.shape[-1])
    sq_norms = {}
    if trainable(layer, "weight"):
        sq_norms["weight"] = weight_sq_norms(activations, backprops)
    if trainable(layer, "bias"):
        sq_norms["bias"] = backprops.sum(1).pow(2).sum(1)
    return sq_norms
