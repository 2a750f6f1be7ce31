"""Training a registered model on a Parquet image table and saving its checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from fimood.lake.tables import read_image_parquet
from fimood.method.features import seeds_from_ids
from fimood.method.splits import check_id_hash_range, training_rows
from fimood.models import build_model, save_model, training_data_record
from fimood.models.training import TrainConfig, mean_nll, train
from fimood.storage import StorageOptions

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    steps: int
    rows: int  # rows trained on: decodable, with the id hash in the range
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
    id_hash_range: tuple[float, float] = (0.0, 1.0),
    storage_options: StorageOptions = None,
    progress: bool = True,
) -> TrainSummary:
    """Train a registered model on a Parquet image table (its images' shape) and save the checkpoint under `out_url`.

    Only the rows whose id's training hash lies in `id_hash_range` = [low, high) are trained on, so the rest
    of the table stays unseen; the checkpoint records the table, the range and the rows (`fimood_training.json`).
    """
    id_hash_range = check_id_hash_range(id_hash_range)
    train_config = train_config or TrainConfig()
    torch.manual_seed(train_config.seed)
    table = read_image_parquet(data_url, storage_options=storage_options)
    model = build_model(model_type, preset, table.images.shape[1:])
    if not table.ok.all():
        logger.warning("training without %d rows that could not be decoded", (~table.ok).sum())
    trained = table.ok & training_rows(table.ids, id_hash_range)
    if not trained.any():
        raise ValueError(f"{data_url}: no decodable row has its id hash in {list(id_hash_range)}; widen the range")
    if id_hash_range != (0.0, 1.0):
        logger.info(
            "training on %d of %d rows: those with the id hash in [%g, %g)", trained.sum(), len(trained), *id_hash_range
        )
    losses = train(model, table.images[trained], train_config, progress=progress)
    test_nll = None
    if test_data_url is not None:
        test = read_image_parquet(test_data_url, model.image_shape, storage_options=storage_options)
        test_ids = [i for i, ok in zip(test.ids, test.ok, strict=True) if ok]
        test_nll = mean_nll(model, test.images[test.ok], seeds_from_ids(test_ids))
    trained_ids = [i for i, keep in zip(table.ids, trained, strict=True) if keep]
    model.training_data = training_data_record(data_url, id_hash_range, trained_ids)
    sha256 = save_model(model, out_url, storage_options)
    return TrainSummary(
        steps=len(losses),
        rows=len(trained_ids),
        final_loss=float(np.mean(losses[-50:])),
        test_nll=test_nll,
        nll_unit=model.nll_unit,
        model_sha256=sha256,
    )
