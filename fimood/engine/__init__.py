"""Per-sample, layer-wise squared gradient norms of a likelihood model's NLL.

`layerwise_grad_norms` is the one entry point; `method` picks the engine, and all engines agree.
"""

from __future__ import annotations

from torch import Tensor, nn

from fimood.engine.hooks import StrictModeError, check_covered, explain, hooks_grad_norms
from fimood.engine.loop import loop_grad_norms
from fimood.engine.result import GradNorms, trainable_parameters
from fimood.engine.vmap import vmap_grad_norms

METHODS = ("auto", "loop", "vmap", "hooks")

__all__ = [
    "METHODS",
    "GradNorms",
    "StrictModeError",
    "check_covered",
    "explain",
    "grad_norms",
    "layerwise_grad_norms",
    "trainable_parameters",
]


def grad_norms(
    model: nn.Module, x: Tensor, seeds: Tensor | None = None, method: str = "auto", strict: bool = False
) -> GradNorms:
    """Squared gradient norms and NLL per sample; see `layerwise_grad_norms`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if seeds is not None and seeds.shape[:1] != x.shape[:1]:
        raise ValueError(f"seeds must have one row per sample ({x.shape[0]}), got shape {tuple(seeds.shape)}")
    if method == "loop":
        return loop_grad_norms(model, x, seeds)
    if method == "vmap" or (method == "auto" and not getattr(model, "layers_see_samples", True)):
        # A model whose sample is a group of rows (`models.GroupSum`) passes each row through its layers
        # separately, so per-layer rules cannot see the samples.
        return vmap_grad_norms(model, x, seeds)
    return hooks_grad_norms(model, x, seeds, strict=strict)


def layerwise_grad_norms(
    model: nn.Module, x: Tensor, seeds: Tensor | None = None, method: str = "auto", strict: bool = False
) -> Tensor:
    """‖∇_θℓ NLL(x_i)‖² for each sample i and each trainable parameter tensor ℓ.

    Args:
        model: a `LikelihoodModel` (anything with `nll(x, seeds) -> (B,)`).
        x: (B, ...) inputs. seeds: int64 (B,) or None.
        method: "loop" (one backward per sample, the reference), "vmap" (torch.func), "hooks" (per-layer
            rules inside one batched backward, exact fallback to vmap where no rule applies), or "auto"
            (hooks; vmap for grouped rows).
        strict: with the hooks engine, raise `StrictModeError` instead of falling back to vmap for a
            tensor no rule covers.
    Returns:
        (B, L) in `model.named_parameters()` order, parameters without requires_grad left out.
    """
    return grad_norms(model, x, seeds, method, strict).sq_norms
