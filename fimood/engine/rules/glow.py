"""Glow's own layers: ActNorm, the LU-parametrised 1×1 convolution, zero-initialised convs, learned priors.

ActNorm and the 1×1 convolution also reach the loss through their log-determinant, a path that
does not depend on the data. The rules build each sample's full gradient u_i + c_i explicitly (it
is small: C or C² numbers), so the cross term 2⟨u_i, c_i⟩ + ‖c_i‖² is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fimood.engine.rules.registry import register_rule, trainable
from fimood.models.glow import ActNorm, InvConv1x1, LearnedPrior, ZeroConv2d


def _log_det_grad(grad_outputs: tuple, like: Tensor) -> Tensor:
    """∂loss_i/∂log_det_i, shape (B,); zero when the log-det does not reach the loss."""
    grad = grad_outputs[1]
    return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device) if grad is None else grad


def _sq_norm(per_sample: Tensor) -> Tensor:
    return per_sample.flatten(1).pow(2).sum(1)


@register_rule(ActNorm, reads="outputs")
def actnorm_sq_norms(layer: ActNorm, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """bias: Σ_hw g·exp(logs); logs: Σ_hw g·y plus H·W·∂loss/∂log_det (the data-independent part)."""
    y, g = outputs[0], grad_outputs[0]
    positions = y.shape[2] * y.shape[3]
    sq_norms = {}
    if trainable(layer, "bias"):
        sq_norms["bias"] = _sq_norm(g.sum((2, 3)) * torch.exp(layer.logs.flatten()))
    if trainable(layer, "logs"):
        log_det_part = positions * _log_det_grad(grad_outputs, y)[:, None]
        sq_norms["logs"] = _sq_norm((g * y).sum((2, 3)) + log_det_part)
    return sq_norms


@register_rule(InvConv1x1)
def invconv_sq_norms(layer: InvConv1x1, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """Per-sample ∂/∂W = Σ_hw g xᵀ (C×C), pulled back through W = P·L·U to lower, upper and log_s."""
    x, g = inputs[0], grad_outputs[0]
    grad_weight = g.flatten(2) @ x.flatten(2).transpose(1, 2)  # (B, C, C)
    eye = torch.eye(layer.lower.shape[0], dtype=x.dtype, device=x.device)
    lower = layer.lower * layer.lower_mask + eye
    upper = layer.upper * layer.lower_mask.T + torch.diag(layer.sign_s * torch.exp(layer.log_s))
    grad_lu = layer.permutation.T @ grad_weight  # ∂/∂(L·U)
    sq_norms = {}
    if trainable(layer, "lower"):
        sq_norms["lower"] = _sq_norm((grad_lu @ upper.T) * layer.lower_mask)
    grad_upper = lower.T @ grad_lu  # ∂/∂U, (B, C, C)
    if trainable(layer, "upper"):
        sq_norms["upper"] = _sq_norm(grad_upper * layer.lower_mask.T)
    if trainable(layer, "log_s"):
        positions = x.shape[2] * x.shape[3]
        diagonal = torch.diagonal(grad_upper, dim1=1, dim2=2) * layer.sign_s * torch.exp(layer.log_s)
        sq_norms["log_s"] = _sq_norm(diagonal + positions * _log_det_grad(grad_outputs, x)[:, None])
    return sq_norms


@register_rule(ZeroConv2d, reads="outputs")
def zero_conv_sq_norms(layer: ZeroConv2d, inputs: tuple, outputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
    """logs scales the output by exp(3·logs): ∂/∂logs = 3·Σ_hw g·y. The inner Conv2d has its own rule."""
    if not trainable(layer, "logs"):
        return {}
    return {"logs": _sq_norm(3.0 * (grad_outputs[0] * outputs[0]).sum((2, 3)))}


@register_rule(LearnedPrior, reads="outputs")
def learned_prior_sq_norms(
    layer: LearnedPrior, inputs: tuple, outputs: tuple, grad_outputs: tuple
) -> dict[str, Tensor]:
    """The parameter is broadcast to every sample, so each sample's gradient is its slice of the output gradient."""
    if not trainable(layer, "value"):
        return {}
    return {"value": _sq_norm(grad_outputs[0])}
