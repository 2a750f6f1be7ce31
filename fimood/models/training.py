"""Maximum-likelihood training of a model on uint8 images, on the CPU or a GPU."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fimood.models.base import LikelihoodModel, pixels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    max_grad_norm: float = 50.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def steps_for_epochs(epochs: float, n_rows: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n_rows / batch_size))


def train(model: LikelihoodModel, images: np.ndarray, config: TrainConfig, progress: bool = True) -> list[float]:
    """Adam on the mean NLL of random batches of uint8 images (N, C, H, W); returns the loss per step.

    Dequantisation noise gets fresh random seeds every step (training wants noise; scoring wants
    it fixed per row). Data-dependent initialisation runs on the first batch.
    """
    generator = torch.Generator().manual_seed(config.seed)
    parameter = next(model.parameters())
    model.train()
    first = torch.randperm(len(images), generator=generator)[: config.batch_size].numpy()
    model.initialize(pixels(images[first], parameter.dtype, parameter.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps))
    losses: list[float] = []
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    bar = tqdm(range(config.steps), desc="train", disable=not progress, unit="step")
    for step in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        rows = order[cursor : cursor + config.batch_size].numpy()
        cursor += config.batch_size
        x = pixels(images[rows], parameter.dtype, parameter.device)
        seeds = torch.randint(-(2**62), 2**62, (len(rows),), generator=generator).to(parameter.device)
        loss = model.training_loss(x, seeds).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step}: loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0:
            recent = float(np.mean(losses[-config.log_every :]))
            bar.set_postfix(loss=f"{recent:.3f}")
            logger.info("step %d: loss %.4f", step + 1, recent)
    model.eval()
    return losses


@torch.no_grad()
def mean_nll(model: LikelihoodModel, images: np.ndarray, seeds: np.ndarray, batch_size: int = 256) -> float:
    """Mean NLL (in the model's `nll_unit`) of uint8 images under fixed per-row seeds."""
    parameter = next(model.parameters())
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = pixels(images[start : start + batch_size], parameter.dtype, parameter.device)
        s = torch.as_tensor(seeds[start : start + batch_size], device=parameter.device)
        total += model.nll(x, s).sum().item()
    return total / len(images)
