"""In-process steps around the pipeline: train a checkpoint, load a detector with its model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fimood.detector import Detector
from fimood.features import seeds_from_ids
from fimood.io import read_image_parquet
from fimood.models import DDPM, VAE, Glow, GlowConfig, LikelihoodModel, VAEConfig, load_model_with_hash, save_model
from fimood.storage import StorageOptions
from fimood.train import TrainConfig, mean_nll, train

logger = logging.getLogger(__name__)


def load_detector_and_model(
    detector_url: str, storage_options: StorageOptions = None, allowed_imports: tuple[str, ...] = ()
) -> tuple[Detector, LikelihoodModel]:
    """Load a detector and its model, refusing a model whose content changed since the fit."""
    detector = Detector.load(detector_url, storage_options)
    model, model_sha256 = load_model_with_hash(detector.model_uri, storage_options, allowed_imports=allowed_imports)
    if model_sha256 != detector.model_sha256:
        raise ValueError(
            f"the model at {detector.model_uri} changed since the detector was fitted "
            f"(sha256 {model_sha256[:12]}, expected {detector.model_sha256[:12]}); fit the detector again"
        )
    return detector, model


# model type → preset name → a fresh model for (C, H, W) images
BUILDERS: dict[str, Callable[[str, tuple[int, int, int]], LikelihoodModel]] = {
    "glow": lambda preset, shape: Glow(GlowConfig.preset(preset, shape)),
    "vae": lambda preset, shape: VAE(VAEConfig.preset(preset, shape)),
    "ddpm": lambda preset, shape: DDPM.from_preset(preset, shape),
}


def build_model(model_type: str, preset: str, image_shape: tuple[int, int, int] = (1, 28, 28)) -> LikelihoodModel:
    """A fresh built-in model from a preset."""
    if model_type not in BUILDERS:
        raise ValueError(f"model_type must be one of {sorted(BUILDERS)}, got {model_type!r}")
    return BUILDERS[model_type](preset, image_shape)


@dataclass
class TrainSummary:
    steps: int
    final_loss: float  # mean training loss over the last 50 steps
    test_nll: float | None  # in the model's `nll_unit`
    nll_unit: str
    model_sha256: str


def train_checkpoint(
    data_url: str,
    out_url: str,
    *,
    model_type: str = "glow",
    preset: str = "small",
    train_config: TrainConfig | None = None,
    test_data_url: str | None = None,
    storage_options: StorageOptions = None,
) -> TrainSummary:
    """Train a built-in model on a Parquet image table and save the checkpoint under `out_url`."""
    train_config = train_config or TrainConfig()
    torch.manual_seed(train_config.seed)
    model = build_model(model_type, preset)
    table = read_image_parquet(data_url, model.image_shape, storage_options=storage_options)
    if not table.ok.all():
        logger.warning("training without %d rows that could not be decoded", (~table.ok).sum())
    losses = train(model, table.images[table.ok], train_config)
    test_nll = None
    if test_data_url is not None:
        test = read_image_parquet(test_data_url, model.image_shape, storage_options=storage_options)
        test_ids = [i for i, ok in zip(test.ids, test.ok, strict=True) if ok]
        test_nll = mean_nll(model, test.images[test.ok], seeds_from_ids(test_ids))
    sha256 = save_model(model, out_url, storage_options)
    return TrainSummary(
        steps=len(losses),
        final_loss=float(np.mean(losses[-50:])),
        test_nll=test_nll,
        nll_unit=model.nll_unit,
        model_sha256=sha256,
    )
