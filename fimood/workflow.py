"""In-process steps around the pipeline: train a checkpoint, load a detector with its model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fimood.detector import Detector
from fimood.features import seeds_from_ids
from fimood.io import read_image_parquet
from fimood.models import Glow, GlowConfig, LikelihoodModel, load_model_with_hash, save_model
from fimood.storage import StorageOptions
from fimood.train import TrainConfig, mean_nll, train

logger = logging.getLogger(__name__)


def load_detector_and_model(
    detector_url: str, storage_options: StorageOptions = None
) -> tuple[Detector, LikelihoodModel]:
    """Load a detector and its model, refusing a model whose content changed since the fit."""
    detector = Detector.load(detector_url, storage_options)
    model, model_sha256 = load_model_with_hash(detector.model_uri, storage_options)
    if model_sha256 != detector.model_sha256:
        raise ValueError(
            f"the model at {detector.model_uri} changed since the detector was fitted "
            f"(sha256 {model_sha256[:12]}, expected {detector.model_sha256[:12]}); fit the detector again"
        )
    return detector, model


@dataclass
class TrainSummary:
    steps: int
    final_bits_per_dim: float  # mean training loss over the last 50 steps
    test_bits_per_dim: float | None
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
    if model_type != "glow":
        raise ValueError(f"model_type must be one of ('glow',), got {model_type!r}")
    torch.manual_seed(train_config.seed)
    model = Glow(GlowConfig.preset(preset))
    table = read_image_parquet(data_url, model.image_shape, storage_options=storage_options)
    if not table.ok.all():
        logger.warning("training without %d rows that could not be decoded", (~table.ok).sum())
    losses = train(model, table.images[table.ok], train_config)
    test_bits_per_dim = None
    if test_data_url is not None:
        test = read_image_parquet(test_data_url, model.image_shape, storage_options=storage_options)
        test_ids = [i for i, ok in zip(test.ids, test.ok, strict=True) if ok]
        test_bits_per_dim = mean_nll(model, test.images[test.ok], seeds_from_ids(test_ids))
    sha256 = save_model(model, out_url, storage_options)
    return TrainSummary(
        steps=len(losses),
        final_bits_per_dim=float(np.mean(losses[-50:])),
        test_bits_per_dim=test_bits_per_dim,
        model_sha256=sha256,
    )
