"""The fit pass: features of every in-distribution row on an actor pool, streamed into the fit reduce
on the driver, which keeps O(features + calibration sample) memory whatever the number of rows."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fimood.engine import trainable_parameters
from fimood.lake.sources import list_partitions, plan_reads
from fimood.method.detector import DetectorArtifact, DetectorSettings
from fimood.method.reduce import FitReduce
from fimood.models import load_model
from fimood.passes.actors import check_strict, feature_rows
from fimood.passes.config import PipelineConfig
from fimood.passes.reading import matrix
from fimood.passes.runtime import start_ray, storage_errors_in_one_line
from fimood.progress import count_errors, rate
from fimood.storage import absolute_url, overlaps

logger = logging.getLogger(__name__)


@dataclass
class FitSummary:
    """What a fit pass read."""

    rows: int
    seconds: float
    errors_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_reason.values())

    def __str__(self) -> str:
        return f"{self.rows} rows ({count_errors(self.errors_by_reason)}) in {rate(self.rows, self.seconds)}"


@storage_errors_in_one_line()
def fit(
    model_url: str,
    data_url: str,
    config: PipelineConfig,
    settings: DetectorSettings | None = None,
    max_calibration_rows: int = 100_000,
) -> tuple[DetectorArtifact, FitSummary]:
    """Feature pass over `data_url` on an actor pool, streamed into the fit reduce on the driver.

    Raises:
        ValueError: when a shard cannot be read, or more than `config.max_error_fraction` of the rows
            could not be scored: a fit where most rows fail is a bug (wrong column, wrong model), not data.
    """
    start = time.perf_counter()
    settings = settings or DetectorSettings()
    model = load_model(model_url, config.storage_options, allowed_imports=config.allowed_imports)
    check_strict(model, config)
    names = [name for name, _ in trainable_parameters(model)]
    spec = config.read_spec(data_url)
    plan = plan_reads(list_partitions(data_url, config.input_format, config.storage_options), spec)
    if plan.unreadable:
        named = "; ".join(f"{path}: {reason}" for path, reason in sorted(plan.unreadable.items()))
        raise ValueError(f"{len(plan.unreadable)} shards cannot be read, so nothing was fitted: {named}")
    units, rows_in = plan.units, plan.rows
    start_ray(config.address)
    # rows of the model's training table (or a folder inside it, or one holding it) in its id-hash range were trained on
    training = model.training_data
    reads_training_data = training is not None and overlaps(training["data"], data_url, config.storage_options)
    training_range = tuple(training["id_hash_range"]) if reads_training_data else None
    reduce = FitReduce(len(names), settings.calibration_fraction, max_calibration_rows, training_range)
    rows, reasons = 0, Counter()
    features = feature_rows(units, spec, model_url, model, config)
    for batch in features.iter_batches(batch_size=1024, batch_format="pyarrow"):
        ok = np.asarray(batch.column("error").is_null())
        rows += len(ok)
        reasons.update(reason for reason in batch.column("error").to_pylist() if reason is not None)
        ids = [i for i, keep in zip(batch.column("id").to_pylist(), ok, strict=True) if keep]
        reduce.add(ids, matrix(batch, "log_sq_norms")[ok], batch.column("nll").to_numpy()[ok])
    summary = FitSummary(rows, time.perf_counter() - start, dict(reasons))
    if rows != sum(rows_in):
        raise RuntimeError(f"fit read {rows} rows where the shards hold {sum(rows_in)}; nothing was fitted")
    if summary.errors > config.max_error_fraction * rows:
        raise ValueError(
            f"fit: {count_errors(summary.errors_by_reason)} in {rows} rows, above the max error fraction "
            f"{config.max_error_fraction}; check the data and the model, nothing was fitted"
        )
    if summary.errors:
        logger.warning("left %d of %d rows out of the fit: they could not be scored", summary.errors, rows)
    training_rows_in_fit = None if training is None else reduce.training_rows
    if training_rows_in_fit:
        fitted = rows - summary.errors
        logger.warning(
            "fit: %d of %d rows (%.1f%%) are rows the model was trained on (%s, id hash in [%g, %g)), which it fits "
            "better than fresh rows, so the detector's in-distribution reference is wrong; fit on rows the model was "
            "not trained on, e.g. train with --id-hash-range 0 0.75 and fit on a table of the rest",
            training_rows_in_fit,
            fitted,
            100 * training_rows_in_fit / fitted,
            training["data"],
            *training["id_hash_range"],
        )
    per_row, typicality = reduce.finish(settings.false_positive_rate, settings.rule)
    detector = DetectorArtifact(
        model_uri=absolute_url(model_url),
        model_sha256=model.checkpoint_sha256,
        feature_names=names,
        settings=settings,
        by_group={1: per_row},
        typicality=typicality,
        extra={
            "fit_data": absolute_url(data_url),
            "training_rows_in_fit": training_rows_in_fit,
            "training_data": training,
        },
        feature_settings=config.feature_settings,
    )
    return detector, summary
