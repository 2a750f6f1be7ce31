"""Your own model: any `nn.Module` plus a function that gives each sample's NLL."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fimood.models.base import LikelihoodModel, validate_images

NllFunction = Callable[[nn.Module, Tensor, Tensor | None], Tensor]


class ModelAdapter(LikelihoodModel):
    """Wraps `module` so every fimood engine, detector and evaluation can use it in-process.

    Args:
        module: the model; its trainable parameters become the features, in `named_parameters()` order.
        nll_fn: `nll_fn(module, x, seeds) -> (B,)`, each row's NLL; x is (B, C, H, W) pixels in [0, 1],
            and any per-row randomness must come from `seeds` (see `fimood.models.noise`).
        image_shape: (C, H, W) of the images the model takes.

    To save and load it (and to run it in the Ray pipeline), subclass `LikelihoodModel` in your own package
    instead and give it `config_dict`; its checkpoint then names `your_package.module:Class` (docs/own-model.md).
    """

    def __init__(self, module: nn.Module, nll_fn: NllFunction, image_shape: tuple[int, int, int]):
        super().__init__()
        self.module, self.nll_fn, self._image_shape = module, nll_fn, tuple(image_shape)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        validate_images(x, self.image_shape)
        nll = self.nll_fn(self.module, x, seeds)
        if nll.shape != x.shape[:1]:
            raise ValueError(f"nll_fn must return one value per row, shape ({x.shape[0]},), got {tuple(nll.shape)}")
        return nll
