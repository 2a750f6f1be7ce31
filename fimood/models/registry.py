"""The one registry of built-in models: `model_type` name → class. The CLI's choices, the study, the
benchmark and checkpoint loading all read it; a model joins it with `@register_model`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fimood.models.base import LikelihoodModel

MODELS: dict[str, type[LikelihoodModel]] = {}


def register_model(cls: type[LikelihoodModel]) -> type[LikelihoodModel]:
    """Class decorator: register a model under its `model_type`, and stamp the class with that name.

    The stamp (`_registered_as`) is what `save_pretrained` reads to write the short name; the model
    contract never reads this registry."""
    name = cls.model_type
    if not name or ":" in name:
        raise ValueError(f"{cls.__name__}.model_type must be a short name without ':', got {name!r}")
    if MODELS.get(name, cls) is not cls:
        raise ValueError(f"model type {name!r} is already registered to {MODELS[name].__qualname__}")
    MODELS[name] = cls
    cls._registered_as = name  # the stamp a checkpoint reads (in this class's own __dict__, never a subclass's)
    return cls


def model_class(name: str) -> type[LikelihoodModel]:
    """The registered class named `name`, or an error listing the names there are."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]


def build_model(name: str, preset: str, image_shape: tuple[int, int, int] | None = None) -> LikelihoodModel:
    """A fresh registered model of one of its presets, for `image_shape` (default: the preset's)."""
    return model_class(name).from_preset(preset, image_shape)
