"""Model checkpoints, never pickle. Two layouts, found by the files in the folder:

- fimood's: `config.json` (model type + settings) and `model.safetensors`. The model type is a
  built-in name (`glow`, `vae`) or, for a user's own model, an import path `package.module:Class`
  that is imported only when the caller allow-lists its package.
- diffusers': a `DDPMPipeline.save_pretrained` folder (`model_index.json`, `unet/`, `scheduler/`),
  with fimood's scoring settings in an optional `fimood.json`.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import safetensors.torch
from fsspec.implementations.local import LocalFileSystem

from fimood.models.base import LikelihoodModel
from fimood.models.glow import Glow
from fimood.models.vae import VAE
from fimood.storage import StorageOptions, filesystem, join, read_bytes, sha256_hex, write_bytes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_INDEX = "model_index.json"
FORMAT_VERSION = 1

# model_type → class; a new built-in model in fimood's layout adds one line here.
MODEL_TYPES: dict[str, type[LikelihoodModel]] = {"glow": Glow, "vae": VAE}


def model_type_of(model: LikelihoodModel) -> str:
    """The built-in name, or `module:Class` for a user's model."""
    cls = type(model)
    return cls.model_type if cls.model_type in MODEL_TYPES else f"{cls.__module__}:{cls.__qualname__}"


def save_model(model: LikelihoodModel, url: str, storage_options: StorageOptions = None) -> str:
    """Write `model` under `url` (any fsspec URL); returns the checkpoint's content hash."""
    if model.model_type == "ddpm":
        from fimood.models.ddpm import save_ddpm

        return save_ddpm(model, url, storage_options)
    config = {"format_version": FORMAT_VERSION, "model_type": model_type_of(model), "config": model.config_dict()}
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    weights_bytes = safetensors.torch.save(state)
    write_bytes(join(url, CONFIG_NAME), config_bytes, storage_options)
    write_bytes(join(url, WEIGHTS_NAME), weights_bytes, storage_options)
    return sha256_hex(config_bytes, weights_bytes)


def load_model(
    url: str, storage_options: StorageOptions = None, *, allowed_imports: Sequence[str] = ()
) -> LikelihoodModel:
    """Rebuild a saved model from `url`, in eval mode on the CPU; see `load_model_with_hash`."""
    return load_model_with_hash(url, storage_options, allowed_imports=allowed_imports)[0]


def load_model_with_hash(
    url: str, storage_options: StorageOptions = None, *, allowed_imports: Sequence[str] = ()
) -> tuple[LikelihoodModel, str]:
    """`load_model`, plus the checkpoint's content hash (recorded by detectors).

    Args:
        allowed_imports: packages (e.g. `["my_models"]`) whose classes a checkpoint may name; a
            checkpoint naming any other import path is refused before anything is imported.
    """
    fs, path = filesystem(url, storage_options)
    if fs.exists(f"{path.rstrip('/')}/{DIFFUSERS_INDEX}"):
        from fimood.models.ddpm import load_ddpm

        return load_ddpm(url, storage_options)
    config_bytes = read_bytes(join(url, CONFIG_NAME), storage_options)
    config = json.loads(config_bytes)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{url}: format_version must be {FORMAT_VERSION}, got {config.get('format_version')!r}")
    model_class = resolve_model_type(str(config.get("model_type")), allowed_imports)
    model = model_class.from_config(config["config"])
    weights_bytes = read_bytes(join(url, WEIGHTS_NAME), storage_options)
    model.load_state_dict(safetensors.torch.load(weights_bytes))
    return model.eval(), sha256_hex(config_bytes, weights_bytes)


def resolve_model_type(model_type: str, allowed_imports: Sequence[str] = ()) -> type[LikelihoodModel]:
    """The class for a built-in name, or for `package.module:Class` when `package` is allow-listed."""
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    module_name, _, class_name = model_type.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)} or 'module:Class', got {model_type!r}")
    if not any(module_name == allowed or module_name.startswith(f"{allowed}.") for allowed in allowed_imports):
        raise PermissionError(
            f"the checkpoint names {model_type!r}, whose module is not allow-listed; "
            f"pass allowed_imports=[{module_name.split('.')[0]!r}] (CLI: --allow-import) if you trust it"
        )
    model_class = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, LikelihoodModel)):
        raise TypeError(f"{model_type!r} must name a subclass of fimood.LikelihoodModel, got {model_class!r}")
    return model_class


@contextmanager
def local_folder(url: str, storage_options: StorageOptions = None) -> Iterator[str]:
    """A local path holding the folder at `url`: the folder itself, or a temporary copy of a remote one."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fimood-model-") as tmp:
        root = path.rstrip("/")
        for remote in fs.find(root):
            local = os.path.join(tmp, os.path.relpath(remote, root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as handle:
                handle.write(fs.cat_file(remote))
        yield tmp


def folder_files(local_path: str) -> list[str]:
    """Relative paths of every file under a local folder, sorted."""
    return sorted(
        os.path.relpath(os.path.join(root, name), local_path)
        for root, _, files in os.walk(local_path)
        for name in files
    )


def folder_sha256(local_path: str) -> str:
    """Content hash of every file under a local folder, by relative path (a change anywhere changes it)."""
    chunks = []
    for relative in folder_files(local_path):
        with open(os.path.join(local_path, relative), "rb") as handle:
            chunks += [relative.encode(), handle.read()]
    return sha256_hex(*chunks)
