"""Loading any model checkpoint, never by pickle. Each class saves and loads its own layout
(`save_pretrained` / `from_pretrained`); this module finds which class a folder holds:

- fimood's layout: `config.json` names the model type, a registered name (`glow`, `vae`) or, for a
  user's own model, an import path `package.module:Class`, imported only when the caller
  allow-lists its package.
- another layout that a registered class marks by its `checkpoint_marker` file, such as a diffusers
  `DDPMPipeline` folder (`model_index.json`) for DDPM.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fsspec.implementations.local import LocalFileSystem

from fimood.models.base import CONFIG_NAME, LikelihoodModel
from fimood.models.registry import MODELS
from fimood.storage import StorageOptions, filesystem, join, parse_json, read_bytes, resilient, sha256_hex


def save_model(model: LikelihoodModel, url: str, storage_options: StorageOptions = None) -> str:
    """Write `model` under `url` (any fsspec URL) in its class's layout; returns the checkpoint's content hash."""
    return model.save_pretrained(url, storage_options)


def load_model(
    url: str, storage_options: StorageOptions = None, *, allowed_imports: Sequence[str] = ()
) -> LikelihoodModel:
    """Rebuild a saved model from `url`, in eval mode on the CPU, with its `checkpoint_sha256`.

    Args:
        allowed_imports: packages (e.g. `["my_models"]`) whose classes a checkpoint may name; a
            checkpoint naming any other import path is refused before anything is imported.
    """
    fs, path = filesystem(url, storage_options)
    fs, path = resilient(fs), path.rstrip("/")
    if fs.exists(f"{path}/{CONFIG_NAME}"):
        config_url = join(url, CONFIG_NAME)
        config = parse_json(read_bytes(config_url, storage_options), config_url, fix="save the model again")
        model_class = resolve_model_type(str(config.get("model_type")), allowed_imports)
    else:
        others = [cls for cls in MODELS.values() if cls.checkpoint_marker != CONFIG_NAME]
        model_class = next((cls for cls in others if fs.exists(f"{path}/{cls.checkpoint_marker}")), None)
        if model_class is None:
            markers = [CONFIG_NAME, *(cls.checkpoint_marker for cls in others)]
            raise FileNotFoundError(f"no model checkpoint at {url}: none of {markers} is there")
        marker_url = join(url, model_class.checkpoint_marker)
        if marker_url.endswith(".json"):  # a marker is read as what it claims to be, never as anything else
            parse_json(read_bytes(marker_url, storage_options), marker_url, fix="save the model again")
    try:
        return model_class.from_pretrained(url, storage_options)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as error:  # a damaged folder, found by our loader (which names the file) or another library's
        if isinstance(error, ValueError) and url in str(error):
            raise
        raise ValueError(
            f"{url}: not a loadable {model_class.model_type} checkpoint ({type(error).__name__}: {error}); "
            "save the model again"
        ) from error


def resolve_model_type(model_type: str, allowed_imports: Sequence[str] = ()) -> type[LikelihoodModel]:
    """The class for a registered name, or for `package.module:Class` when `package` is allow-listed."""
    if model_type in MODELS:
        return MODELS[model_type]
    module_name, _, class_name = model_type.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"model_type must be one of {sorted(MODELS)} or 'module:Class', got {model_type!r}")
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
    fs = resilient(fs)
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
