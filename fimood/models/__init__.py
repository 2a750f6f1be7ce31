"""Likelihood models: the contract, one registry, one file per built-in model, your own model's
adapter, and checkpoints. Importing this package registers the built-in models."""

from fimood.models.adapter import ModelAdapter
from fimood.models.base import GpuUnusable, LikelihoodModel, Preset, training_data_record
from fimood.models.checkpoint import load_model, save_model
from fimood.models.ddpm import DDPM, DDPMConfig
from fimood.models.glow import Glow, GlowConfig
from fimood.models.grouped import GroupSum
from fimood.models.registry import MODELS, build_model, model_class, register_model
from fimood.models.vae import VAE, VAEConfig

__all__ = [
    "DDPM",
    "MODELS",
    "VAE",
    "DDPMConfig",
    "Glow",
    "GlowConfig",
    "GpuUnusable",
    "GroupSum",
    "LikelihoodModel",
    "ModelAdapter",
    "Preset",
    "VAEConfig",
    "build_model",
    "load_model",
    "model_class",
    "register_model",
    "save_model",
    "training_data_record",
]
