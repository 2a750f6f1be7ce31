"""The in-process fit and score passes: read a table, compute features, fit or score, write back."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from fimood.baselines import TypicalityTest
from fimood.detector import Detector, DetectorSettings, GradNormDetector
from fimood.features import Features, compute_features, seeds_from_ids
from fimood.io import ImageTable, read_image_parquet, write_table_atomic
from fimood.models import Glow, GlowConfig, LikelihoodModel, load_model_with_hash, save_model
from fimood.storage import StorageOptions, join
from fimood.train import TrainConfig, mean_nll, train

logger = logging.getLogger(__name__)

SCORE_FILE = "part-00000.parquet"


def calibration_mask(ids: list[str], fraction: float) -> np.ndarray:
    """(N,) True for rows in the calibration split, chosen by a hash of the id (stable, order-free)."""
    hashes = [
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, person=b"fimood-calib").digest(), "little")
        for i in ids
    ]
    return np.array([h / 2**64 < fraction for h in hashes], dtype=bool)


def _features(
    model: LikelihoodModel, table: ImageTable, rows: np.ndarray, settings: DetectorSettings, group_size: int, label: str
) -> Features:
    ids = [table.ids[i] for i in rows]
    return compute_features(
        model,
        table.images[rows],
        seeds_from_ids(ids),
        group_size=group_size,
        method=settings.method,
        batch_size=settings.batch_size,
        progress=label,
    )


def fit_detector(
    model_url: str,
    data_url: str,
    settings: DetectorSettings | None = None,
    *,
    limit: int | None = None,
    storage_options: StorageOptions = None,
) -> Detector:
    """Fit the paper's detector on in-distribution rows (not the model's training rows).

    Rows are split into fit and calibration sets by a hash of their id; rows that cannot be decoded
    are left out and counted.
    """
    settings = settings or DetectorSettings()
    model, model_sha256 = load_model_with_hash(model_url, storage_options)
    table = read_image_parquet(data_url, model.image_shape, limit=limit, storage_options=storage_options)
    ok = table.ok
    if not ok.all():
        logger.warning("left out %d of %d rows that could not be decoded", (~ok).sum(), len(ok))
    calibration = calibration_mask(table.ids, settings.calibration_fraction)
    fit_rows, calibration_rows = np.flatnonzero(ok & ~calibration), np.flatnonzero(ok & calibration)
    by_group, typicality = {}, None
    for size in settings.group_sizes:
        fit_features = _features(model, table, fit_rows, settings, size, f"fit features (group {size})")
        calibration_features = _features(
            model, table, calibration_rows, settings, size, f"calibration features (group {size})"
        )
        by_group[size] = GradNormDetector(false_positive_rate=settings.false_positive_rate).fit(
            fit_features.log_sq_norms, calibration_features.log_sq_norms
        )
        if size == 1:
            typicality = TypicalityTest().fit(fit_features.nll)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return Detector(
        model_uri=model_url,
        model_sha256=model_sha256,
        feature_names=names,
        settings=settings,
        by_group=by_group,
        typicality=typicality,
        extra={"fit_data": data_url},
    )


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
class ScoreSummary:
    rows: int
    errors: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"scored {self.rows} rows ({self.errors} errors) in {self.seconds:.1f} s, "
            f"{self.rows / max(self.seconds, 1e-9):.1f} rows/s"
        )


def score_table(detector: Detector, model: LikelihoodModel, table: ImageTable) -> pa.Table:
    """The score table of DESIGN.md for decoded rows; rows with an error keep null scores."""
    ok = np.flatnonzero(table.ok)
    features = _features(model, table, ok, detector.settings, 1, "score features")
    per_row = detector.by_group[1]
    ood_score = np.full(len(table.ids), np.nan)
    nll = np.full(len(table.ids), np.nan)
    ood_score[ok], nll[ok] = per_row.ood_score(features.log_sq_norms), features.nll
    mask = ~table.ok
    return pa.table(
        {
            "id": pa.array(table.ids, pa.string()),
            "ood_score": pa.array(ood_score, mask=mask),
            "p_value": pa.array(per_row.p_value(ood_score), mask=mask),
            "is_ood": pa.array(per_row.predict(ood_score), mask=mask),
            "nll": pa.array(nll, mask=mask),
            "error": pa.array(table.errors, pa.string()),
            "detector_id": pa.array([detector.detector_id] * len(table.ids), pa.string()),
        }
    )


def score(detector_url: str, data_url: str, out_url: str, *, storage_options: StorageOptions = None) -> ScoreSummary:
    """Score every row of `data_url` and write the score table under `out_url`."""
    start = time.perf_counter()
    detector, model = load_detector_and_model(detector_url, storage_options)
    table = read_image_parquet(data_url, model.image_shape, storage_options=storage_options)
    scores = score_table(detector, model, table)
    write_table_atomic(scores, join(out_url, SCORE_FILE), storage_options)
    return ScoreSummary(rows=len(table.ids), errors=int((~table.ok).sum()), seconds=time.perf_counter() - start)


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
