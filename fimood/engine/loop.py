"""The reference engine: one backward pass per sample, as the paper's code does."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fimood.engine.result import GradNorms, trainable_parameters


def loop_grad_norms(model: nn.Module, x: Tensor, seeds: Tensor | None = None) -> GradNorms:
    """Per-sample, per-tensor squared gradient norms by B separate backward passes."""
    names, params = zip(*trainable_parameters(model), strict=True)
    sq_norms, nlls = [], []
    for i in range(x.shape[0]):
        row_seeds = None if seeds is None else seeds[i : i + 1]
        nll = model.nll(x[i : i + 1], row_seeds).sum()
        grads = torch.autograd.grad(nll, params, allow_unused=True)
        sq_norms.append(torch.stack([_sq_norm(g, p) for g, p in zip(grads, params, strict=True)]))
        nlls.append(nll.detach())
    return GradNorms(sq_norms=torch.stack(sq_norms), nll=torch.stack(nlls), names=list(names))


def _sq_norm(grad: Tensor | None, param: Tensor) -> Tensor:
    # A parameter the loss does not reach has a zero gradient, not a missing feature.
    if grad is None:
        return torch.zeros((), dtype=param.dtype, device=param.device)
    return grad.pow(2).sum()
