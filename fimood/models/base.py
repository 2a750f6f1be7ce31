"""The likelihood-model contract every fimood model meets, and how a model saves and loads itself."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from fimood.models.registry import MODELS
from fimood.storage import StorageOptions, join, parse_json, parse_safetensors, read_bytes, sha256_hex, write_bytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preset:
    """A named size of a model: its settings, and the image shape it is built for unless told otherwise."""

    settings: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, int, int] = (1, 28, 28)


class LikelihoodModel(nn.Module, ABC):
    """An `nn.Module` that gives each sample's negative log-likelihood.

    Subclasses implement `nll`. All per-row randomness (dequantisation noise, diffusion noise,
    latent samples) must come from `seeds`, so a row's value never depends on its batch.
    A model that can be saved gives `config_dict`/`from_config`; a built-in one also has a
    `model_type` name, `presets`, and `@register_model` (`fimood.models.registry`).
    """

    model_type: ClassVar[str] = ""
    nll_unit: ClassVar[str] = "nats"  # what `nll` measures, for reports
    presets: ClassVar[dict[str, Preset]] = {}
    study_train_steps: ClassVar[int] = 1500  # how long `fimood study` trains it on FashionMNIST
    checkpoint_marker: ClassVar[str] = CONFIG_NAME  # the file a checkpoint writes last: it marks a whole one
    image_shape: tuple[int, int, int]  # (C, H, W) of the images `nll` takes
    checkpoint_sha256: str | None = None  # content hash of the checkpoint it was saved to or loaded from

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

    @classmethod
    def from_preset(cls, name: str, image_shape: tuple[int, int, int] | None = None) -> LikelihoodModel:
        """A fresh model of a preset, for `image_shape` (default: the preset's)."""
        if name not in cls.presets:
            raise ValueError(f"{cls.model_type or cls.__name__} presets are {sorted(cls.presets)}, got {name!r}")
        preset = cls.presets[name]
        return cls.from_config({**preset.settings, "image_shape": tuple(image_shape or preset.image_shape)})

    def forward(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        return self.nll(x, seeds)

    def save_pretrained(self, url: str, storage_options: StorageOptions = None) -> str:
        """Write `model.safetensors`, then `config.json` (model type and settings), under any fsspec URL.

        The weights go first, so a folder with a `config.json` always holds a whole checkpoint.
        Returns the checkpoint's content hash.
        """
        cls = type(self)
        model_type = cls.model_type if MODELS.get(cls.model_type) is cls else f"{cls.__module__}:{cls.__qualname__}"
        config = {"format_version": FORMAT_VERSION, "model_type": model_type, "config": self.config_dict()}
        config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
        state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.state_dict().items()}
        weights_bytes = safetensors.torch.save(state)
        write_bytes(join(url, WEIGHTS_NAME), weights_bytes, storage_options)
        write_bytes(join(url, CONFIG_NAME), config_bytes, storage_options)
        self.checkpoint_sha256 = sha256_hex(config_bytes, weights_bytes)
        return self.checkpoint_sha256

    @classmethod
    def from_pretrained(cls, url: str, storage_options: StorageOptions = None) -> LikelihoodModel:
        """Rebuild a model saved by `save_pretrained`, in eval mode on the CPU, with its `checkpoint_sha256`."""
        fix = "save the model again"
        config_url, weights_url = join(url, CONFIG_NAME), join(url, WEIGHTS_NAME)
        config_bytes = read_bytes(config_url, storage_options)
        config = parse_json(config_bytes, config_url, fix=fix)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_url}: format_version must be {FORMAT_VERSION}, got {config.get('format_version')!r} "
                "(a newer fimood wrote it?); save the model with this version"
            )
        model = cls.from_config(config["config"])
        weights_bytes = read_bytes(weights_url, storage_options)
        model.load_state_dict(parse_safetensors(weights_bytes, safetensors.torch.load, weights_url, fix=fix))
        model.checkpoint_sha256 = sha256_hex(config_bytes, weights_bytes)
        return model.eval()


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


def pixels(images: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """uint8 images (B, C, H, W) → float pixels in [0, 1], what `nll` takes."""
    return torch.as_tensor(images, device=device).to(dtype) / 255.0


def validate_images(x: Tensor, image_shape: tuple[int, int, int]) -> None:
    """Raise a clear error when `x` is not a (B, *image_shape) float batch."""
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"expected images of shape (B, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"expected float pixels in [0, 1], got dtype {x.dtype}")
