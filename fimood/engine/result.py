"""What every gradient engine returns, and which parameters it covers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class GradNorms:
    """Per-sample squared gradient norms of the NLL, one column per trainable parameter tensor."""

    sq_norms: Tensor  # (B, L), in `names` order
    nll: Tensor  # (B,)
    names: list[str]  # L parameter names, as in model.named_parameters()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter with requires_grad, in named_parameters() order."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True; there is nothing to score")
    return params
