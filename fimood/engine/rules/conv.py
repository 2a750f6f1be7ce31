"""Convolutions (1-D and 2-D; any stride, padding mode, dilation and groups) as linear maps on patches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fimood.engine.rules.linear import weight_sq_norms
from fimood.engine.rules.registry import register_rule, trainable


def _as_2d(layer: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, tuple, tuple, tuple]:
    """Input padded by the layer's padding mode, output gradient, and 2-D kernel, stride and dilation."""
    padding_mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=padding_mode)
    if isinstance(layer, nn.Conv1d):
        x, g = x.unsqueeze(2), g.unsqueeze(2)
    kernel, stride, dilation = (
        (1, *v) if isinstance(layer, nn.Conv1d) else tuple(v) for v in (layer.kernel_size, layer.stride, layer.dilation)
    )
    return x, g, kernel, stride, dilation


def _patches(x: Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> Tensor:
    """The patch each output position sees, (B, C·k0·k1, T), as one copy of a strided view.

    (F.unfold gives the same, but on CUDA it launches one kernel per sample.)
    """
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    windows = x.unfold(2, spans[0], stride[0]).unfold(3, spans[1], stride[1])  # (B, C, H', W', span0, span1)
    windows = windows[..., :: dilation[0], :: dilation[1]]  # (B, C, H', W', k0, k1)
    batch, channels, out_h, out_w = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * kernel[0] * kernel[1], out_h * out_w)


def _explicit_sq_norms(x: Tensor, g: Tensor, kernel: tuple, stride: tuple, dilation: tuple) -> Tensor:
    """‖∂/∂W‖² per sample from explicit per-sample weight gradients (groups = 1), cheaply for any width.

    ∂/∂W[o, c, a, b] = Σ_t g[o, t]·x[c, t·stride + (a, b)·dilation]. Narrow inputs are unfolded into
    patches; wide ones are not: the output gradient is spread instead onto the input grid, one map
    per kernel offset, and multiplied with the input.
    """
    batch, out_channels = g.shape[:2]
    if kernel == (1, 1) and stride == (1, 1):
        return weight_sq_norms(x.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2))
    if x.shape[1] * kernel[0] * kernel[1] <= out_channels:
        patches = _patches(x, kernel, stride, dilation)
        return weight_sq_norms(patches.transpose(1, 2), g.flatten(2).transpose(1, 2))
    (out_h, out_w), (s0, s1), (d0, d1) = g.shape[2:], stride, dilation
    spread = g.new_zeros(
        batch,
        out_channels,
        *kernel,
        (out_h - 1) * s0 + d0 * (kernel[0] - 1) + 1,
        (out_w - 1) * s1 + d1 * (kernel[1] - 1) + 1,
    )
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            spread[:, :, a, b, a * d0 :: s0, b * d1 :: s1][:, :, :out_h, :out_w] = g
    covered = x[:, :, : spread.shape[-2], : spread.shape[-1]]
    grads = spread.flatten(1, 3).flatten(2) @ covered.flatten(2).transpose(1, 2)  # (B, C_out·k, C_in)
    return grads.pow(2).flatten(1).sum(1)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_sq_norms(
    layer: nn.Conv1d | nn.Conv2d, inputs: tuple, outputs: tuple, grad_outputs: tuple
) -> dict[str, Tensor]:
    """Per group, the weight gradient is Σ_t g_t a_tᵀ over output positions t; norms add over groups."""
    sq_norms = {}
    if trainable(layer, "weight"):
        x, g, kernel, stride, dilation = _as_2d(layer, inputs[0], grad_outputs[0])
        batch, groups = g.shape[0], layer.groups
        positions = g.shape[2] * g.shape[3]
        d, p = layer.in_channels // groups * kernel[0] * kernel[1], layer.out_channels // groups
        if groups == 1 and positions * (d + p) >= d * p:
            sq_norms["weight"] = _explicit_sq_norms(x, g, kernel, stride, dilation)
        else:
            patches = _patches(x, kernel, stride, dilation)  # (B, C_in·k, T)
            activations = patches.reshape(batch * groups, d, -1).transpose(1, 2)
            backprops = g.reshape(batch * groups, p, -1).transpose(1, 2)
            sq_norms["weight"] = weight_sq_norms(activations, backprops).reshape(batch, groups).sum(1)
    if trainable(layer, "bias"):
        sq_norms["bias"] = grad_outputs[0].flatten(2).sum(2).pow(2).sum(1)
    return sq_norms
