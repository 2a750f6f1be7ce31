"""The paper's grouped variant: one loss for a group of M rows, the sum of their NLLs."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from fimood.models.base import LikelihoodModel


class GroupSum(LikelihoodModel):
    """Wraps a model so one "sample" is a group of M rows: nll(x[B, M, ...]) = Σ_m model.nll(x[b, m]).

    Its gradient features are those of the summed loss of M points (the paper's batch-size-M test).
    """

    layers_see_samples: ClassVar[bool] = False  # its layers see rows, not groups: the engines use vmap

    def __init__(self, model: LikelihoodModel):
        super().__init__()
        self.model = model

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        groups, size = x.shape[:2]
        flat_seeds = None if seeds is None else seeds.reshape(groups * size)
        return self.model.nll(x.reshape(groups * size, *x.shape[2:]), flat_seeds).reshape(groups, size).sum(1)
