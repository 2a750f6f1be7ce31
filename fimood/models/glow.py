"""Glow (Kingma & Dhariwal, 2018): a multi-scale flow of ActNorm → invertible 1×1 conv → affine coupling.

The parametrisation follows the reference implementation: LU-decomposed 1×1 convolutions, coupling
networks conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → zero-initialised conv3×3, a learned
conditional prior at each split and a learned top prior. `paper` (hidden 512, K 32, L 3) on
32×32×3 images has 44.2M parameters in 1,351 tensors. Scoring is free of in-place ops, so
`torch.func` transforms apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimood.models import noise
from fimood.models.base import ConfiguredModel, Preset, validate_images
from fimood.models.registry import register_model

PRESETS = {
    "tiny": Preset({"hidden_channels": 8, "depth": 2, "levels": 2}),
    "small": Preset({"hidden_channels": 64, "depth": 8, "levels": 2}),
    "paper": Preset({"hidden_channels": 512, "depth": 32, "levels": 3}, (3, 32, 32)),
}


@dataclass(frozen=True)
class GlowConfig:
    """Settings of a Glow model; round-trips through JSON."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    hidden_channels: int = 64
    depth: int = 8  # K: flow steps per level
    levels: int = 2  # L: number of squeeze/split levels
    n_bits: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width) > 0, got {self.image_shape}")
        for name in ("hidden_channels", "depth", "levels", "n_bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        scale = 2**self.levels
        if self.image_shape[1] % scale or self.image_shape[2] % scale:
            raise ValueError(
                f"levels={self.levels} needs height and width divisible by {scale}, got image_shape={self.image_shape}"
            )


class ActNorm(nn.Module):
    """Per-channel affine map y = (x + bias)·exp(logs); log-det = H·W·Σ logs, the same for every sample.

    The log-det comes out per sample, shape (B,), so a gradient engine can see each sample's share of
    this data-independent path (docs/method.md, "What it costs").
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def initialize(self, x: Tensor) -> None:
        """Set bias and scale so that this batch comes out with zero mean and unit variance."""
        with torch.no_grad():
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            std = x.std(dim=(0, 2, 3), keepdim=True)
            self.bias.copy_(-mean)
            self.logs.copy_(-torch.log(std + 1e-6))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[2:]
        log_det = (height * width * self.logs.sum()).expand(x.shape[0])
        return (x + self.bias) * torch.exp(self.logs), log_det


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution W = P·(L + I)·(U + diag(sign·exp(log_s))); log-det = H·W·Σ log_s, shape (B,)."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def weight(self) -> Tensor:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[2:]
        log_det = (height * width * self.log_s.sum()).expand(x.shape[0])
        return F.conv2d(x, self.weight()[:, :, None, None]), log_det


class ConvActNorm(nn.Module):
    """Bias-free convolution followed by ActNorm (its log-det is not part of the likelihood)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(self.conv(x))[0]


class ZeroConv2d(nn.Module):
    """3×3 convolution initialised to zero, output scaled by exp(3·logs), so a new flow starts as identity."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(3.0 * self.logs)


class LearnedPrior(nn.Module):
    """A learned Gaussian's (mean, log-scale) maps, shared by all samples: (2C, H, W) → (B, 2C, H, W)."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, z: Tensor) -> Tensor:
        return self.value.expand(z.shape[0], -1, -1, -1)


class AffineCoupling(nn.Module):
    """y_b = (x_b + shift)·sigmoid(raw_scale + 2), with (shift, raw_scale) = NN(x_a); y_a = x_a."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        half = channels // 2
        self.net = nn.Sequential(
            ConvActNorm(half, hidden_channels, 3),
            nn.ReLU(),
            ConvActNorm(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, 2 * (channels - half)),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        x_a, x_b = x[:, :half], x[:, half:]
        h = self.net(x_a)
        shift, raw_scale = h[:, 0::2], h[:, 1::2]
        scale = torch.sigmoid(raw_scale + 2.0)
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], dim=1), torch.log(scale).flatten(1).sum(1)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, logdet_actnorm = self.actnorm(x)
        x, logdet_invconv = self.invconv(x)
        x, logdet_coupling = self.coupling(x)
        return x, logdet_actnorm + logdet_invconv + logdet_coupling


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2), moving each 2×2 block into channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def gaussian_log_prob(z: Tensor, mean: Tensor, logs: Tensor) -> Tensor:
    """Σ log N(z; mean, exp(logs)²) over all but the batch dimension, shape (B,)."""
    log_prob = -0.5 * (math.log(2 * math.pi) + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))
    return log_prob.flatten(1).sum(1)


@dataclass
class GlowOutput:
    """What one pass through the flow gives."""

    nll: Tensor  # (B,) bits per dimension
    log_prior: Tensor  # (B,) nats
    log_det: Tensor  # (B,) nats, including the dequantisation scale
    latents: list[Tensor] = field(default_factory=list)  # one (B, C_l, H_l, W_l) per level


@register_model
class Glow(ConfiguredModel):
    """Glow for images in [0, 1]; `nll` is bits per dimension of the dequantised image."""

    model_type = "glow"
    presets = PRESETS
    config_class = GlowConfig
    nll_unit = "bits/dim"

    def __init__(self, config: GlowConfig | None = None, **overrides: Any):
        super().__init__()
        self.config = replace(config or GlowConfig(), **overrides)
        channels, height, width = self.config.image_shape
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        for level in range(self.config.levels):
            channels, height, width = channels * 4, height // 2, width // 2
            steps = [FlowStep(channels, self.config.hidden_channels) for _ in range(self.config.depth)]
            self.levels.append(nn.ModuleList(steps))
            if level < self.config.levels - 1:
                self.split_priors.append(ZeroConv2d(channels // 2, 2 * (channels - channels // 2)))
                channels = channels // 2
        self.top_prior = LearnedPrior((2 * channels, height, width))

    def initialize(self, x: Tensor) -> None:
        """Data-dependent ActNorm initialisation (Kingma & Dhariwal §3.1) from one batch."""
        handles = [
            module.register_forward_pre_hook(_initialize_once)
            for module in self.modules()
            if isinstance(module, ActNorm)
        ]
        try:
            with torch.no_grad():
                self.nll(x)
        finally:
            for handle in handles:
                handle.remove()

    def dequantize(self, x: Tensor, seeds: Tensor | None) -> Tensor:
        """Pixels in [0, 1] → bin index + noise (seeded, or the bin midpoint), scaled to [-0.5, 0.5]."""
        bins = 2**self.config.n_bits
        pixels = torch.floor(x.clamp(0, 1) * (bins - 1) + 0.5)
        offset = torch.full_like(x, 0.5) if seeds is None else noise.uniform(seeds, tuple(x.shape[1:]), dtype=x.dtype)
        return (pixels + offset) / bins - 0.5

    def encode(self, x: Tensor, seeds: Tensor | None = None) -> GlowOutput:
        # 1. dequantise; the 1/bins scaling contributes -D·log(bins) to the log-determinant
        validate_images(x, self.config.image_shape)
        h = self.dequantize(x, seeds)
        dims = h[0].numel()
        log_det = torch.full((x.shape[0],), -dims * math.log(2**self.config.n_bits), dtype=x.dtype, device=x.device)
        log_prior = torch.zeros_like(log_det)
        latents = []
        # 2. per level: squeeze, K flow steps, then split off half with a learned conditional prior
        for level, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level < len(self.split_priors):
                kept, z = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
                prior = self.split_priors[level](kept)
                log_prior = log_prior + gaussian_log_prob(z, prior[:, 0::2], prior[:, 1::2])
                latents.append(z)
                h = kept
        # 3. learned top prior
        prior = self.top_prior(h)
        log_prior = log_prior + gaussian_log_prob(h, prior[:, 0::2], prior[:, 1::2])
        latents.append(h)
        nll = -(log_prior + log_det) / (dims * math.log(2.0))
        return GlowOutput(nll=nll, log_prior=log_prior, log_det=log_det, latents=latents)

    def nll(self, x: Tensor, seeds: Tensor | None = None) -> Tensor:
        return self.encode(x, seeds).nll


def _initialize_once(module: ActNorm, inputs: tuple[Tensor, ...]) -> None:
    module.initialize(inputs[0])
