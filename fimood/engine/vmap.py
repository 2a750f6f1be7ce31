"""Per-sample gradients with torch.func: vmap over grad, in chunks so memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fimood.engine.result import GradNorms, trainable_parameters


class _NllCall(nn.Module):
    """Routes `forward` to `model.nll`, so functional_call reaches the NLL whatever the model's forward is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, seeds: Tensor | None) -> Tensor:
        return self.model.nll(x, seeds)


@contextmanager
def _tensors_restored(model: nn.Module) -> Iterator[None]:
    """Put every parameter and buffer object back afterwards: functional_call leaves plain tensors behind
    when one module is registered under two names (seen with torch 2.13)."""
    slots = [
        (table, name, tensor)
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for name, tensor in table.items()
    ]
    try:
        yield
    finally:
        for table, name, tensor in slots:
            table[name] = tensor


def vmap_grad_norms(
    model: nn.Module, x: Tensor, seeds: Tensor | None = None, chunk_size: int = 64, only: list[str] | None = None
) -> GradNorms:
    """Per-sample, per-tensor squared gradient norms by `vmap(grad(nll))`, `chunk_size` samples at a time.

    `only` restricts the result to these trainable parameters (the hooks engine's fallback).
    """
    names = [name for name, _ in trainable_parameters(model) if only is None or name in only]
    wrapper = _NllCall(model)
    trainable = {f"model.{name}": p.detach() for name, p in trainable_parameters(model) if name in names}
    fixed = {
        name: tensor.detach()
        for name, tensor in [*wrapper.named_parameters(), *wrapper.named_buffers()]
        if name not in trainable
    }

    def sample_nll(params: dict[str, Tensor], x_i: Tensor, seed_i: Tensor | None) -> Tensor:
        seeds_i = None if seed_i is None else seed_i[None]
        return functional_call(wrapper, {**params, **fixed}, (x_i[None], seeds_i)).sum()

    def sample_sq_norms(x_i: Tensor, seed_i: Tensor | None) -> tuple[Tensor, Tensor]:
        grads, nll = grad_and_value(sample_nll)(trainable, x_i, seed_i)
        return torch.stack([grads[f"model.{name}"].pow(2).sum() for name in names]), nll

    in_dims = (0, None if seeds is None else 0)
    with _tensors_restored(model):
        sq_norms, nll = vmap(sample_sq_norms, in_dims=in_dims, chunk_size=chunk_size)(x, seeds)
    return GradNorms(sq_norms=sq_norms, nll=nll.detach(), names=names)
