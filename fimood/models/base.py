"""The likelihood-model contract every fimood model meets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class LikelihoodModel(nn.Module, ABC):
    """An `nn.Module` that gives each sample's negative log-likelihood.

    Subclasses implement `nll`. All per-row randomness (dequantisation noise, diffusion noise,
    latent samples) must come from `seeds`, so a row's value never depends on its batch.
    Built-in models also carry a JSON-serialisable `config` and a `model_type` name, so that
    `fimood.models.save_model` / `load_model` can rebuild them.
    """

    model_type: ClassVar[str] = ""
    nll_unit: ClassVar[str] = "nats"  # what `nll` measures, for reports
    image_shape: tuple[int, int, int]  # (C, H, W) of the images `nll` takes

    @abstractmethod
    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        """Per-sample negative log-likelihood, differentiable in the parameters.

        Args:
            x: pixels in [0, 1], shape (B, C, H, W).
            seeds: int64 (B,) fixing each row's randomness; None means the model's
                deterministic choice (e.g. the bin midpoint for dequantisation).
        Returns:
            (B,) losses; any positive scale (nats, bits/dim) is allowed.
        """

    def training_loss(self, x: Tensor, seeds: Tensor) -> Tensor:
        """Per-sample loss that training minimises (default: the NLL), shape (B,)."""
        return self.nll(x, seeds)

    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation, run once on the first training batch (default: none)."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LikelihoodModel:
        """Rebuild from `config_dict()`'s output (default: keyword arguments of the constructor)."""
        return cls(**config)

    def config_dict(self) -> dict[str, Any]:
        """The constructor settings as JSON-compatible values (built-in models override)."""
        raise NotImplementedError(f"{type(self).__name__} has no config; it cannot be saved by fimood")

    def forward(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        return self.nll(x, seeds)


class ConfiguredModel(LikelihoodModel):
    """A model built from one config dataclass that holds `image_shape` (Glow, the VAE): the config is
    what a checkpoint stores and what `from_config` rebuilds from."""

    config_class: ClassVar[type]
    config: Any  # an instance of config_class

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ConfiguredModel:
        return cls(cls.config_class(**config))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


def validate_images(x: Tensor, image_shape: tuple[int, int, int]) -> None:
    """Raise a clear error when `x` is not a (B, *image_shape) float batch."""
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"expected images of shape (B, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}")
