"""The likelihood-model contract every fimood model meets, and how a model saves and loads itself."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from fimood.storage import (
    StorageOptions,
    absolute_url,
    filesystem,
    join,
    parse_json,
    parse_safetensors,
    read_bytes,
    resilient,
    sha256_hex,
    write_bytes,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
TRAINING_DATA_NAME = "fimood_training.json"  # what the model was trained on, when fimood trained it
TRAINING_DATA_FORMAT = "fimood-training-data"
TRAINING_DATA_FORMAT_VERSION = 1
TRAINING_DATA_KEYS = ("data", "id_hash_range", "rows", "ids_sha256")


class GpuUnusable(RuntimeError):
    """A model replica was given a GPU its torch cannot use: it would run on the CPU while holding the card."""


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
    checkpoint_marker: ClassVar[str] = CONFIG_NAME  # the file a checkpoint writes last: it marks a whole one
    _registered_as: ClassVar[str | None] = None  # set by `@register_model` on the class it registers
    image_shape: tuple[int, int, int]  # (C, H, W) of the images `nll` takes
    checkpoint_sha256: str | None = None  # content hash of the checkpoint it was saved to or loaded from
    training_data: dict[str, Any] | None = None  # `training_data_record` of what it was trained on, if known

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
        """Write `model.safetensors`, `fimood_training.json` (with a `training_data` record), then `config.json`
        (model type and settings), under any fsspec URL.

        The weights go first, so a folder with a `config.json` always holds a whole checkpoint.
        Returns the checkpoint's content hash (which covers the training record).
        """
        cls = type(self)
        model_type = cls.model_type if _is_registered(cls) else f"{cls.__module__}:{cls.__qualname__}"
        config = {"format_version": FORMAT_VERSION, "model_type": model_type, "config": self.config_dict()}
        config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
        state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.state_dict().items()}
        weights_bytes = safetensors.torch.save(state)
        write_bytes(join(url, WEIGHTS_NAME), weights_bytes, storage_options)
        hashed = [config_bytes, weights_bytes]
        if self.training_data is None:
            remove_training_data(url, storage_options)
        else:
            hashed.append(training_data_bytes(self.training_data))
            write_bytes(join(url, TRAINING_DATA_NAME), hashed[-1], storage_options)
        write_bytes(join(url, CONFIG_NAME), config_bytes, storage_options)
        self.checkpoint_sha256 = sha256_hex(*hashed)
        return self.checkpoint_sha256

    @classmethod
    def from_pretrained(cls, url: str, storage_options: StorageOptions = None) -> LikelihoodModel:
        """Rebuild a model saved by `save_pretrained`, in eval mode on the CPU, with its `checkpoint_sha256`
        and `training_data`."""
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
        hashed = [config_bytes, weights_bytes]
        training_url = join(url, TRAINING_DATA_NAME)
        fs, path = filesystem(training_url, storage_options)
        if resilient(fs).exists(path):  # older checkpoints have none; their hash is what it always was
            hashed.append(read_bytes(training_url, storage_options))
            model.training_data = parse_training_data(hashed[-1], training_url)
        model.checkpoint_sha256 = sha256_hex(*hashed)
        return model.eval()


def _is_registered(cls: type[LikelihoodModel]) -> bool:
    """Whether `@register_model` registered this very class under its `model_type` (a subclass of a
    registered class inherits no stamp: it is read from the class's own `__dict__`)."""
    return cls.__dict__.get("_registered_as") == cls.model_type


def training_data_record(data_url: str, id_hash_range: tuple[float, float], ids: Sequence[str]) -> dict[str, Any]:
    """What a model was trained on: the table, the id-hash range of its rows, and the ids' count and digest."""
    return {
        "format": TRAINING_DATA_FORMAT,
        "format_version": TRAINING_DATA_FORMAT_VERSION,
        "data": absolute_url(data_url),
        "id_hash_range": [float(id_hash_range[0]), float(id_hash_range[1])],
        "rows": len(ids),
        "ids_sha256": sha256_hex("\n".join(sorted(ids)).encode()),
    }


def training_data_bytes(record: dict[str, Any]) -> bytes:
    """A training record as the bytes of `fimood_training.json` (checked as a reader checks it)."""
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    parse_training_data(data, "model.training_data")
    return data


def remove_training_data(url: str, storage_options: StorageOptions = None) -> None:
    """Remove the training record an earlier save left under `url`, so it never describes a model saved without one."""
    fs, path = filesystem(join(url, TRAINING_DATA_NAME), storage_options)
    fs = resilient(fs)
    if fs.exists(path):
        fs.rm(path)


def parse_training_data(data: bytes, url: str) -> dict[str, Any]:
    """The training record read from `url`; anything else is one error naming the file."""
    record = parse_json(data, url, fix="train the model again, or remove the file to load it without a record")
    if not isinstance(record, dict) or record.get("format") != TRAINING_DATA_FORMAT:
        raise ValueError(f"{url}: expected a {TRAINING_DATA_FORMAT!r} record, got {str(record)[:80]!r}")
    version = record.get("format_version")
    if version != TRAINING_DATA_FORMAT_VERSION:
        raise ValueError(
            f"{url}: format_version must be {TRAINING_DATA_FORMAT_VERSION}, got {version!r} (a newer fimood wrote "
            "it?); train the model with this version, or remove the file to load it without a record"
        )
    missing = [key for key in TRAINING_DATA_KEYS if key not in record]
    if missing:
        raise ValueError(f"{url}: the training record lacks {missing}; train the model again")
    return record


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
