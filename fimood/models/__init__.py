"""Likelihood models: the contract, the built-in models and their checkpoints."""

from fimood.models.base import LikelihoodModel
from fimood.models.checkpoint import MODEL_TYPES, load_model, load_model_with_hash, save_model
from fimood.models.glow import Glow, GlowConfig
from fimood.models.grouped import GroupSum

__all__ = [
    "MODEL_TYPES",
    "Glow",
    "GlowConfig",
    "GroupSum",
    "LikelihoodModel",
    "load_model",
    "load_model_with_hash",
    "save_model",
]
