"""Model checkpoints: a directory with `config.json` and `model.safetensors`. Never pickle."""

from __future__ import annotations

import json

import safetensors.torch

from fimood.models.base import LikelihoodModel
from fimood.models.glow import Glow, GlowConfig
from fimood.storage import StorageOptions, join, read_bytes, sha256_hex, write_bytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

# model_type → (model class, config class); a new built-in model adds one line here.
MODEL_TYPES: dict[str, tuple[type[LikelihoodModel], type]] = {"glow": (Glow, GlowConfig)}


def save_model(model: LikelihoodModel, url: str, storage_options: StorageOptions = None) -> str:
    """Write `model` under `url`; returns the checkpoint's content hash (sha256 of config and weights)."""
    if model.model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model.model_type!r}")
    config = {"format_version": FORMAT_VERSION, "model_type": model.model_type, "config": model.config_dict()}
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    weights_bytes = safetensors.torch.save(state)
    write_bytes(join(url, CONFIG_NAME), config_bytes, storage_options)
    write_bytes(join(url, WEIGHTS_NAME), weights_bytes, storage_options)
    return sha256_hex(config_bytes, weights_bytes)


def load_model(url: str, storage_options: StorageOptions = None) -> LikelihoodModel:
    """Rebuild a saved model from `url` (any fsspec URL), in eval mode on the CPU."""
    return load_model_with_hash(url, storage_options)[0]


def load_model_with_hash(url: str, storage_options: StorageOptions = None) -> tuple[LikelihoodModel, str]:
    """`load_model`, plus the checkpoint's content hash (recorded by detectors)."""
    config_bytes = read_bytes(join(url, CONFIG_NAME), storage_options)
    config = json.loads(config_bytes)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{url}: format_version must be {FORMAT_VERSION}, got {config.get('format_version')!r}")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{url}: model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    model_class, config_class = MODEL_TYPES[model_type]
    model = model_class(config_class(**config["config"]))
    weights_bytes = read_bytes(join(url, WEIGHTS_NAME), storage_options)
    model.load_state_dict(safetensors.torch.load(weights_bytes))
    return model.eval(), sha256_hex(config_bytes, weights_bytes)
