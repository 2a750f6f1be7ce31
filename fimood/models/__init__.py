"""Likelihood models: the contract, the built-in models, your own model's adapter, and checkpoints."""

from fimood.models.adapter import ModelAdapter
from fimood.models.base import LikelihoodModel
from fimood.models.checkpoint import MODEL_TYPES, load_model, load_model_with_hash, save_model
from fimood.models.ddpm import DDPM, DDPMConfig
from fimood.models.glow import Glow, GlowConfig
from fimood.models.grouped import GroupSum
from fimood.models.vae import VAE, VAEConfig

__all__ = [
    "DDPM",
    "MODEL_TYPES",
    "VAE",
    "DDPMConfig",
    "Glow",
    "GlowConfig",
    "GroupSum",
    "LikelihoodModel",
    "ModelAdapter",
    "VAEConfig",
    "load_model",
    "load_model_with_hash",
    "save_model",
]
