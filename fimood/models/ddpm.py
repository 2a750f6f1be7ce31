"""DDPM (Ho et al., 2020) on diffusers' `UNet2DModel` and `DDPMScheduler`, scored at fixed timesteps.

`nll` is the paper's quantity for diffusion models: the variational bound's weighted
noise-prediction loss at chosen timesteps (default the least-noisy one), with each row's noise
drawn from its seed. Checkpoints are diffusers pipeline folders (`DDPMPipeline.save_pretrained`),
so a user's own folder loads as it is; fimood's scoring settings sit beside it in `fimood.json`, and what
fimood trained it on in `fimood_training.json`.
Diffusers is an optional extra: `pip install fimood[diffusion]`.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fimood.models import noise
from fimood.models.base import (
    TRAINING_DATA_NAME,
    LikelihoodModel,
    Preset,
    parse_training_data,
    remove_training_data,
    training_data_bytes,
    validate_images,
)
from fimood.models.checkpoint import folder_files, folder_sha256, local_folder
from fimood.models.registry import register_model
from fimood.storage import StorageOptions, join, write_bytes

SETTINGS_NAME = "fimood.json"

PRESETS = {  # the UNet's settings
    "tiny": Preset(
        {
            "block_out_channels": (8, 16),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
            "norm_num_groups": 4,
            "attention_head_dim": 8,
        }
    ),
    "small": Preset(  # attention only at 7×7 (and in the middle block): 280k parameters, ~0.3 s a step on 2 CPU cores
        {
            "block_out_channels": (16, 32, 32),
            "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            "attention_head_dim": 8,
        }
    ),
}


def import_diffusers():
    """diffusers, or an error that says how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as error:
        raise ImportError("DDPM models need diffusers: pip install 'fimood[diffusion]'") from error


@dataclass(frozen=True)
class DDPMConfig:
    """How a DDPM is scored; the UNet and the noise schedule keep their own diffusers configs."""

    timesteps: tuple[int, ...] = (0,)  # 0 is the least-noisy step in diffusers' numbering
    n_draws: int = 1  # noise draws per timestep, averaged

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if not self.timesteps or min(self.timesteps) < 0:
            raise ValueError(f"timesteps must be a non-empty list of steps >= 0, got {self.timesteps}")
        if self.n_draws < 1:
            raise ValueError(f"n_draws must be positive, got {self.n_draws}")


@register_model
class DDPM(LikelihoodModel):
    """A diffusers `UNet2DModel` noise predictor with a `DDPMScheduler`'s β schedule.

    Attention key biases are frozen: softmax ignores a shift shared by all keys, so their gradient is
    zero in exact arithmetic and its norm would be rounding noise, not a feature. Attention runs on
    diffusers' plain `AttnProcessor` (the same maths as the fused kernel), which `torch.func.vmap` batches.
    """

    model_type = "ddpm"
    nll_unit = "weighted noise error"
    presets = PRESETS
    checkpoint_marker = "model_index.json"  # a diffusers pipeline folder; written last

    def __init__(self, unet: Any, scheduler: Any, config: DDPMConfig | None = None):
        super().__init__()
        self.config = config or DDPMConfig()
        prediction = scheduler.config.prediction_type
        if prediction != "epsilon":
            raise ValueError(f"the scheduler's prediction_type must be 'epsilon', got {prediction!r}")
        n_steps = len(scheduler.betas)
        if max(self.config.timesteps) >= n_steps:
            raise ValueError(f"timesteps must be below num_train_timesteps={n_steps}, got {self.config.timesteps}")
        self.unet, self.scheduler = unet, scheduler
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self._image_shape = (unet.config.in_channels, height, width)
        # in float64, and 1 − ᾱ_t kept apart: at t = 0 it is β_0 ≈ 1e-4, which 1 − ᾱ_t in float32 gets wrong
        betas = scheduler.betas.double()
        log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), dim=0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", log_alphas_cumprod.exp(), persistent=False)
        self.register_buffer("one_minus_alphas_cumprod", -torch.expm1(log_alphas_cumprod), persistent=False)
        processors = import_diffusers().models.attention_processor
        for module in unet.modules():
            if isinstance(module, processors.Attention):
                module.set_processor(processors.AttnProcessor())
                if module.to_k.bias is not None:
                    module.to_k.bias.requires_grad_(False)

    @classmethod
    def from_preset(
        cls, name: str, image_shape: tuple[int, int, int] | None = None, config: DDPMConfig | None = None
    ) -> DDPM:
        """A fresh model: a preset UNet and the linear β schedule of Ho et al. over 1,000 steps."""
        if name not in PRESETS:
            raise ValueError(f"ddpm presets are {sorted(PRESETS)}, got {name!r}")
        diffusers = import_diffusers()
        channels, height, width = image_shape or PRESETS[name].image_shape
        unet = diffusers.UNet2DModel(
            sample_size=(height, width),
            in_channels=channels,
            out_channels=channels,
            layers_per_block=1,
            **PRESETS[name].settings,
        )
        return cls(unet, diffusers.DDPMScheduler(num_train_timesteps=1000), config)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def noise_error(self, x: Tensor, seeds: Tensor | None, timesteps: Tensor, stream: int) -> Tensor:
        """‖ε − ε_θ(x_t, t)‖² per dimension, shape (B,)."""
        # 1. pixels in [0, 1] → the model's [-1, 1]; noise from the row's seed (zero without one)
        x0 = 2 * x - 1
        shape = tuple(x.shape[1:])
        eps = torch.zeros_like(x) if seeds is None else noise.normal(seeds, shape, stream=stream, dtype=x.dtype)
        # 2. forward process q(x_t | x_0) (Ho et al., eq. 4)
        alpha_bar = self.alphas_cumprod.to(x.dtype)[timesteps].view(-1, 1, 1, 1)
        one_minus_alpha_bar = self.one_minus_alphas_cumprod.to(x.dtype)[timesteps].view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x0 + one_minus_alpha_bar.sqrt() * eps
        # 3. predict the noise
        eps_pred = self.unet(x_t, timesteps, return_dict=False)[0]
        return (eps - eps_pred).pow(2).flatten(1).mean(dim=1)

    def bound_weight(self, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
        """β_t / (2 α_t (1 − ᾱ_t)): the variational bound's weight of the noise error with σ_t² = β_t (eq. 12)."""
        beta = self.betas.to(dtype)[timesteps]
        return beta / (2 * (1 - beta) * self.one_minus_alphas_cumprod.to(dtype)[timesteps])

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        """Mean bound-weighted noise error over the configured timesteps and noise draws, shape (B,)."""
        validate_images(x, self.image_shape)
        terms = []
        for index, step in enumerate(self.config.timesteps):
            timesteps = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            weight = self.bound_weight(timesteps, x.dtype)
            for draw in range(self.config.n_draws):
                terms.append(weight * self.noise_error(x, seeds, timesteps, stream=index * self.config.n_draws + draw))
        return torch.stack(terms).mean(dim=0)

    def save_pretrained(self, url: str, storage_options: StorageOptions = None) -> str:
        """Write a diffusers `DDPMPipeline` folder plus `fimood.json` (and `fimood_training.json` with a
        `training_data` record) under `url`; returns its content hash, which covers every file.

        `model_index.json` goes last, so a folder that has one always holds a whole checkpoint.
        """
        diffusers = import_diffusers()
        settings = {"format_version": 1, "model_type": self.model_type, "config": self.config_dict()}
        with tempfile.TemporaryDirectory(prefix="fimood-ddpm-") as tmp:
            pipeline = diffusers.DDPMPipeline(unet=self.unet, scheduler=self.scheduler)
            pipeline.save_pretrained(tmp, safe_serialization=True)
            with open(os.path.join(tmp, SETTINGS_NAME), "w") as handle:
                json.dump(settings, handle, indent=2, sort_keys=True)
            if self.training_data is None:
                remove_training_data(url, storage_options)
            else:
                with open(os.path.join(tmp, TRAINING_DATA_NAME), "wb") as handle:
                    handle.write(training_data_bytes(self.training_data))
            files = sorted(folder_files(tmp), key=lambda relative: relative == self.checkpoint_marker)
            for relative in files:
                with open(os.path.join(tmp, relative), "rb") as handle:
                    write_bytes(join(url, relative), handle.read(), storage_options)
            self.checkpoint_sha256 = folder_sha256(tmp)
        return self.checkpoint_sha256

    @classmethod
    def from_pretrained(cls, url: str, storage_options: StorageOptions = None) -> DDPM:
        """Load a diffusers DDPM folder (safetensors weights only, never from a hub), with its content hash and
        `training_data`."""
        diffusers = import_diffusers()
        with local_folder(url, storage_options) as path:
            unet = diffusers.UNet2DModel.from_pretrained(
                path, subfolder="unet", use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
            )
            scheduler = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
            config = DDPMConfig()
            settings_file = os.path.join(path, SETTINGS_NAME)
            if os.path.exists(settings_file):
                with open(settings_file) as handle:
                    config = DDPMConfig(**json.load(handle)["config"])
            model = cls(unet, scheduler, config).eval()
            training_file = os.path.join(path, TRAINING_DATA_NAME)
            if os.path.exists(training_file):
                with open(training_file, "rb") as handle:
                    model.training_data = parse_training_data(handle.read(), join(url, TRAINING_DATA_NAME))
            model.checkpoint_sha256 = folder_sha256(path)
        return model

    def training_loss(self, x: Tensor, seeds: Tensor) -> Tensor:
        """The simple loss (eq. 14): the unweighted noise error at a timestep drawn from each row's seed, (B,)."""
        n_steps = len(self.betas)
        uniform = noise.uniform(seeds, (1,), stream=1_000_003, dtype=torch.float64).flatten()
        timesteps = (uniform * n_steps).long().clamp(max=n_steps - 1)
        return self.noise_error(x, seeds, timesteps, stream=0)
