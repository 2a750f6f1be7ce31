"""A convolutional VAE (Kingma & Welling, 2014) whose `nll` is the negative ELBO in bits per dimension.

The decoder's likelihood is a discretised logistic over the 256 pixel levels (Salimans et al., 2017):
the data are 8-bit, and it gives each level a probability, so the ELBO bounds a real likelihood in
the same units as Glow's. (A Bernoulli decoder would treat grey levels as probabilities of a binary
pixel: not a likelihood of the data.) The one latent sample per row comes from the row's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimood.models import noise
from fimood.models.base import ConfiguredModel, Preset, validate_images
from fimood.models.registry import register_model

PRESETS = {
    "tiny": Preset({"hidden_channels": 4, "latent_dim": 4}),
    "small": Preset({"hidden_channels": 32, "latent_dim": 16}),
}
MIN_LOG_SCALE = -7.0


@dataclass(frozen=True)
class VAEConfig:
    """Settings of a VAE; round-trips through JSON."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    hidden_channels: int = 32
    latent_dim: int = 16
    n_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width) > 0, got {self.image_shape}")
        if self.image_shape[1] % 4 or self.image_shape[2] % 4:
            raise ValueError(f"height and width must be divisible by 4, got image_shape={self.image_shape}")
        for name in ("hidden_channels", "latent_dim", "n_bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, n_bits: int) -> Tensor:
    """log P(x) of pixels x in [-1, 1] under a logistic discretised into 2**n_bits bins; edges take the tails."""
    half_bin = 1.0 / (2**n_bits - 1)
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    plus, minus = inv_scale * (centered + half_bin), inv_scale * (centered - half_bin)
    log_cdf_plus = plus - F.softplus(plus)  # log σ(plus), for the lowest bin
    log_survival_minus = -F.softplus(minus)  # log (1 − σ(minus)), for the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # where the bin mass underflows, use the density at the centre times the bin width
    middle = inv_scale * centered
    log_density_mid = middle - log_scale - 2 * F.softplus(middle) + math.log(2 * half_bin)
    log_mass = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_density_mid)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_survival_minus, log_mass))


@register_model
class VAE(ConfiguredModel):
    """Encoder: two stride-2 convolutions and a linear map to (μ, log σ²); decoder: the mirror image with
    nearest upsampling + 3×3 convolutions, ending in a per-pixel logistic mean and log-scale."""

    model_type = "vae"
    presets = PRESETS
    config_class = VAEConfig
    nll_unit = "bits/dim (-ELBO)"

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        channels, height, width = config.image_shape
        hidden = config.hidden_channels
        self.bottom_shape = (2 * hidden, height // 4, width // 4)
        flat = math.prod(self.bottom_shape)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * hidden, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(flat, 2 * config.latent_dim),
        )
        self.decoder_input = nn.Linear(config.latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        """−ELBO in bits/dim with one latent sample per row (its posterior mean without a seed), shape (B,)."""
        validate_images(x, self.config.image_shape)
        # 1. pixels in [0, 1] → bin centres in [-1, 1]
        levels = 2**self.config.n_bits - 1
        x_scaled = torch.floor(x.clamp(0, 1) * levels + 0.5) / levels * 2 - 1
        # 2. q(z | x) and a reparameterised sample
        mean, log_var = self.encoder(x_scaled).chunk(2, dim=1)
        eps = torch.zeros_like(mean) if seeds is None else noise.normal(seeds, tuple(mean.shape[1:]), dtype=x.dtype)
        z = mean + torch.exp(0.5 * log_var) * eps
        # 3. p(x | z): discretised logistic per pixel
        h = self.decoder(self.decoder_input(z).view(-1, *self.bottom_shape))
        pixel_mean, log_scale = h.chunk(2, dim=1)
        log_px = discretized_logistic_log_prob(
            x_scaled, pixel_mean, log_scale.clamp_min(MIN_LOG_SCALE), self.config.n_bits
        )
        # 4. −ELBO = −log p(x|z) + KL(q(z|x) ‖ N(0, I)), in bits per dimension
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(dim=1)
        dims = x[0].numel()
        return (kl - log_px.flatten(1).sum(dim=1)) / (dims * math.log(2.0))
